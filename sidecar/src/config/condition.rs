//! The condition language of `where` keys and `<metric> where <cond>`, and the metric
//! expressions (`count`, `sum(f)`, …, `quantiles(f, 0.5%)`), parsed once at config load.
//!
//! Conditions: `field op value` with `=`, `!=` (also `<>`), `<`, `<=`, `>`, `>=`, and
//! `field in (v, …)` / `field not in (v, …)`, joined by `and`, `or`, `not` and parentheses
//! (`not` binds tighter than `and`, `and` tighter than `or`; keywords in any case). Values are
//! single-quoted strings (a quote inside is written `''`) or exact decimals (`400`, `-1`,
//! `0.25`).
//!
//! Meaning, decided here:
//! - an absent field reads as the empty string (as `group_by` does);
//! - `=`/`!=`/`in` with a string compare the value's bytes with the string's;
//! - a comparison with a number (`<`-style always take a number) reads the value as a number
//!   by the one rule of [`read_number`] (lists such as `0.1, 0.2` read as their sum) and
//!   compares exact decimals, so `status = 200` also matches `200.0`;
//! - a value that is not a number makes that comparison *unknown*, and is reported
//!   ([`Outcome::bad_number`], for the caller to count); an empty value makes it unknown too,
//!   without a report. Unknown follows SQL's three-valued logic: `not unknown` is unknown,
//!   `false and unknown` is false, `true or unknown` is true, and an event matches only when
//!   the whole condition is true. So `rt <= 1` and `not (rt > 1)` agree, and a condition
//!   selects what PostgreSQL's `WHERE` would select over the same values with `NULL` for
//!   non-numbers. Evaluation stops as soon as the result is known, so a comparison that was
//!   not needed reports nothing.
//!
//! Field names resolve once, at bind time, to indices into the record's values
//! ([`Condition::bind`]); evaluation allocates nothing. Errors carry the 1-based character
//! position in the expression: the caller prefixes file and key
//! (`logtally.toml: rule[0].metrics.views: at 17: expected a value after '='`).

use std::fmt;

use crate::aggregate::numeric_list::{read_number, Numeric, Reading};
use crate::aggregate::quantiles::DEFAULT_ALPHA;
use crate::aggregate::short_eq;
use crate::aggregate::Decimal;

mod parse;

use parse::Parser;

/// Deepest nesting of parentheses and `not` accepted.
pub const MAX_DEPTH: usize = 32;
/// Longest field name (PostgreSQL's identifier limit, as spool field names).
const MAX_FIELD_LEN: usize = 63;

/// A parsed condition over field names. [`bind`](Condition::bind) it to a segment's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    root: Node<String>,
}

/// A condition whose fields are indices into a record's values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundCondition {
    root: Node<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node<F> {
    And(Box<Node<F>>, Box<Node<F>>),
    Or(Box<Node<F>>, Box<Node<F>>),
    Not(Box<Node<F>>),
    Compare { field: F, op: Op, value: Literal },
    In { field: F, values: Vec<Literal> },
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A value written in a condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Literal {
    Text(String),
    Number(Decimal),
}

/// What evaluating a condition on one event gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Outcome {
    /// The whole condition is true.
    pub matched: bool,
    /// A comparison needed a number and the value was not one (count it).
    pub bad_number: bool,
}

/// A metric expression: what a metric column computes, and over which events.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricExpr {
    pub function: MetricFunction,
    /// `<function> where <cond>`: only events the condition matches.
    pub filter: Option<Condition>,
}

/// What a metric computes.
#[derive(Debug, Clone, PartialEq)]
pub enum MetricFunction {
    Count,
    Sum(String),
    Min(String),
    Max(String),
    Distinct(String),
    /// `quantiles(f)` (relative accuracy [`DEFAULT_ALPHA`]) or `quantiles(f, 0.5%)`.
    Quantiles {
        field: String,
        alpha: f64,
    },
}

/// A parse error: where (1-based character position, one past the end for "missing") and
/// what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at {at}: {problem}")]
pub struct ExprError {
    pub at: usize,
    pub problem: ExprProblem,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExprProblem {
    #[error("expected a value after '{0}'")]
    ExpectedValue(&'static str),
    #[error("expected a number after '{0}' (only =, != and in compare strings)")]
    ExpectedNumber(&'static str),
    #[error("expected a field name, found {0}")]
    ExpectedField(String),
    #[error("expected an operator (=, !=, <, <=, >, >=, in) after '{field}', found {found}")]
    ExpectedOperator { field: String, found: String },
    #[error("expected '(' after '{0}'")]
    ExpectedOpenParen(&'static str),
    #[error("expected ')', found {0}")]
    ExpectedCloseParen(String),
    #[error("expected ',' or ')' in the list, found {0}")]
    ExpectedListSeparator(String),
    #[error("expected {expected}, found {found}")]
    ExpectedEnd {
        expected: &'static str,
        found: String,
    },
    #[error("unterminated string (a quote inside a string is written '')")]
    UnterminatedString,
    #[error("strings are written in single quotes")]
    DoubleQuoted,
    #[error("bad number '{0}' (expected digits, an optional '.' and at most 9 decimals)")]
    BadNumber(String),
    #[error("unexpected character '{0}'")]
    UnexpectedChar(char),
    #[error("field name longer than {MAX_FIELD_LEN} bytes")]
    FieldTooLong,
    #[error("nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error(
        "unknown function \"{0}\" (expected count, sum(f), min(f), max(f), distinct(f), quantiles(f))"
    )]
    UnknownFunction(String),
    #[error("expected a relative accuracy from 0.01% to 10% (e.g. 0.5%), found {0}")]
    BadAccuracy(String),
}

/// A field the bind step did not find among the record's fields.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown field \"{0}\"")]
pub struct UnknownField(pub String);

/// Parses a condition (a rule's `where`, or what follows `where` in a metric).
pub fn parse_condition(text: &str) -> Result<Condition, ExprError> {
    let mut p = Parser::new(text)?;
    let root = p.or_expr()?;
    p.expect_end("'and', 'or' or the end")?;
    Ok(Condition { root })
}

/// Parses a metric expression: `count`, `sum(f)`, `min(f)`, `max(f)`, `distinct(f)`,
/// `quantiles(f)`, `quantiles(f, 0.5%)`, each optionally followed by `where <cond>`.
pub fn parse_metric(text: &str) -> Result<MetricExpr, ExprError> {
    let mut p = Parser::new(text)?;
    let function = p.metric_function()?;
    let filter = if p.eat_keyword("where") {
        Some(Condition { root: p.or_expr()? })
    } else {
        None
    };
    let expected = if filter.is_some() {
        "'and', 'or' or the end"
    } else {
        "'where' or the end"
    };
    p.expect_end(expected)?;
    Ok(MetricExpr { function, filter })
}

impl Condition {
    /// The field names used, each once, in order of first use.
    pub fn fields(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        self.root.visit_fields(&mut |f: &String| {
            if !out.contains(&f.as_str()) {
                out.push(f);
            }
        });
        out
    }

    /// Resolves field names to their index in `fields` (a segment header's field list).
    pub fn bind<S: AsRef<str>>(&self, fields: &[S]) -> Result<BoundCondition, UnknownField> {
        self.bind_with(|name| fields.iter().position(|f| f.as_ref() == name))
    }

    /// Resolves field names with `resolve`. An index past the record's values reads as an
    /// absent field, so a caller that tolerates a field the segment lacks may map it to
    /// `usize::MAX`.
    pub fn bind_with(
        &self,
        mut resolve: impl FnMut(&str) -> Option<usize>,
    ) -> Result<BoundCondition, UnknownField> {
        let root = self.root.map_fields(&mut |name: &String| {
            resolve(name).ok_or_else(|| UnknownField(name.clone()))
        })?;
        Ok(BoundCondition { root })
    }
}

impl BoundCondition {
    /// Evaluates the condition on one record's values (`None` absent). Allocates nothing.
    #[inline]
    pub fn eval(&self, values: &[Option<&[u8]>]) -> Outcome {
        let mut bad_number = false;
        let matched = eval(&self.root, values, &mut bad_number) == Truth::True;
        Outcome {
            matched,
            bad_number,
        }
    }
}

impl<F> Node<F> {
    fn map_fields<G, E>(&self, f: &mut impl FnMut(&F) -> Result<G, E>) -> Result<Node<G>, E> {
        Ok(match self {
            Node::And(a, b) => Node::And(Box::new(a.map_fields(f)?), Box::new(b.map_fields(f)?)),
            Node::Or(a, b) => Node::Or(Box::new(a.map_fields(f)?), Box::new(b.map_fields(f)?)),
            Node::Not(a) => Node::Not(Box::new(a.map_fields(f)?)),
            Node::Compare { field, op, value } => Node::Compare {
                field: f(field)?,
                op: *op,
                value: value.clone(),
            },
            Node::In { field, values } => Node::In {
                field: f(field)?,
                values: values.clone(),
            },
        })
    }

    fn visit_fields<'s>(&'s self, f: &mut impl FnMut(&'s F)) {
        match self {
            Node::And(a, b) | Node::Or(a, b) => {
                a.visit_fields(f);
                b.visit_fields(f);
            }
            Node::Not(a) => a.visit_fields(f),
            Node::Compare { field, .. } | Node::In { field, .. } => f(field),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Evaluation

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Truth {
    False,
    True,
    Unknown,
}

impl Truth {
    fn of(b: bool) -> Truth {
        if b {
            Truth::True
        } else {
            Truth::False
        }
    }
}

fn eval(node: &Node<usize>, values: &[Option<&[u8]>], bad: &mut bool) -> Truth {
    match node {
        Node::And(a, b) => match eval(a, values, bad) {
            Truth::False => Truth::False,
            left => match (left, eval(b, values, bad)) {
                (_, Truth::False) => Truth::False,
                (Truth::True, Truth::True) => Truth::True,
                _ => Truth::Unknown,
            },
        },
        Node::Or(a, b) => match eval(a, values, bad) {
            Truth::True => Truth::True,
            left => match (left, eval(b, values, bad)) {
                (_, Truth::True) => Truth::True,
                (Truth::False, Truth::False) => Truth::False,
                _ => Truth::Unknown,
            },
        },
        Node::Not(a) => match eval(a, values, bad) {
            Truth::True => Truth::False,
            Truth::False => Truth::True,
            Truth::Unknown => Truth::Unknown,
        },
        Node::Compare { field, op, value } => {
            let v = field_value(values, *field);
            match value {
                Literal::Text(t) => Truth::of(short_eq(v, t.as_bytes()) == (*op == Op::Eq)),
                Literal::Number(n) => match number(v, bad) {
                    Some(x) => Truth::of(op.holds(x.cmp(n))),
                    None => Truth::Unknown,
                },
            }
        }
        Node::In {
            field,
            values: list,
        } => {
            let v = field_value(values, *field);
            let mut numeric: Option<Option<Decimal>> = None;
            for item in list {
                let hit = match item {
                    Literal::Text(t) => short_eq(v, t.as_bytes()),
                    Literal::Number(n) => {
                        *numeric.get_or_insert_with(|| number(v, bad)) == Some(*n)
                    }
                };
                if hit {
                    return Truth::True;
                }
            }
            match numeric {
                Some(None) => Truth::Unknown,
                _ => Truth::False,
            }
        }
    }
}

#[inline]
fn field_value<'a>(values: &[Option<&'a [u8]>], index: usize) -> &'a [u8] {
    values.get(index).copied().flatten().unwrap_or(b"")
}

/// The value as a number (`None`: empty, or not a number — then `bad` is set).
#[inline]
fn number(v: &[u8], bad: &mut bool) -> Option<Decimal> {
    match read_number(v, Reading::Sum) {
        Numeric::Value(d) => Some(d),
        Numeric::Empty => None,
        Numeric::Bad => {
            *bad = true;
            None
        }
    }
}

impl Op {
    fn holds(self, ord: std::cmp::Ordering) -> bool {
        use std::cmp::Ordering::*;
        match self {
            Op::Eq => ord == Equal,
            Op::Ne => ord != Equal,
            Op::Lt => ord == Less,
            Op::Le => ord != Greater,
            Op::Gt => ord == Greater,
            Op::Ge => ord != Less,
        }
    }

    fn symbol(self) -> &'static str {
        match self {
            Op::Eq => "=",
            Op::Ne => "!=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
        }
    }
}

// ---------------------------------------------------------------------------------------
// Display: the canonical text, which parses back to the same tree.

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_node(f, &self.root)
    }
}

impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Literal::Number(d) => write!(f, "{d}"),
            Literal::Text(s) => write!(f, "'{}'", s.replace('\'', "''")),
        }
    }
}

fn precedence<F>(n: &Node<F>) -> u8 {
    match n {
        Node::Or(..) => 1,
        Node::And(..) => 2,
        Node::Not(..) => 3,
        _ => 4,
    }
}

fn write_child(
    f: &mut fmt::Formatter<'_>,
    child: &Node<String>,
    min_precedence: u8,
) -> fmt::Result {
    if precedence(child) < min_precedence {
        f.write_str("(")?;
        write_node(f, child)?;
        f.write_str(")")
    } else {
        write_node(f, child)
    }
}

fn write_node(f: &mut fmt::Formatter<'_>, n: &Node<String>) -> fmt::Result {
    match n {
        Node::Or(a, b) | Node::And(a, b) => {
            let p = precedence(n);
            write_child(f, a, p)?;
            f.write_str(if p == 1 { " or " } else { " and " })?;
            // The parser is left-associative: a right child of the same kind needs parentheses.
            write_child(f, b, p + 1)
        }
        Node::Not(a) => {
            f.write_str("not ")?;
            write_child(f, a, 3)
        }
        Node::Compare { field, op, value } => write!(f, "{field} {} {value}", op.symbol()),
        Node::In { field, values } => {
            write!(f, "{field} in (")?;
            for (i, v) in values.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{v}")?;
            }
            f.write_str(")")
        }
    }
}

impl fmt::Display for MetricExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.function {
            MetricFunction::Count => f.write_str("count")?,
            MetricFunction::Sum(x) => write!(f, "sum({x})")?,
            MetricFunction::Min(x) => write!(f, "min({x})")?,
            MetricFunction::Max(x) => write!(f, "max({x})")?,
            MetricFunction::Distinct(x) => write!(f, "distinct({x})")?,
            MetricFunction::Quantiles { field, alpha } if *alpha == DEFAULT_ALPHA => {
                write!(f, "quantiles({field})")?
            }
            MetricFunction::Quantiles { field, alpha } => {
                write!(f, "quantiles({field}, {}%)", alpha * 100.0)?
            }
        }
        if let Some(c) = &self.filter {
            write!(f, " where {c}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
