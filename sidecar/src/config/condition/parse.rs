//! Lexing and recursive-descent parsing of conditions and metric expressions.
//!
//! Grammar (keywords in any case):
//! ```text
//! metric     := function ('where' or_expr)?
//! function   := 'count' ('(' ')')? | ('sum'|'min'|'max'|'distinct') '(' field ')'
//!             | 'quantiles' '(' field (',' number '%')? ')'
//! or_expr    := and_expr ('or' and_expr)*
//! and_expr   := unary ('and' unary)*
//! unary      := 'not' unary | '(' or_expr ')' | comparison
//! comparison := field op value | field 'not'? 'in' '(' value (',' value)* ')'
//! ```

use super::{ExprError, ExprProblem, Literal, MetricFunction, Node, Op, MAX_DEPTH, MAX_FIELD_LEN};
use crate::aggregate::quantiles::{DEFAULT_ALPHA, MAX_ALPHA, MIN_ALPHA};
use crate::aggregate::Decimal;

#[derive(Debug, Clone, PartialEq)]
enum Tok<'a> {
    Ident(&'a str),
    Str(String),
    Num(Decimal),
    Op(Op),
    LParen,
    RParen,
    Comma,
    Percent,
    End,
}

#[derive(Debug, Clone)]
struct Token<'a> {
    tok: Tok<'a>,
    /// Byte offset in the text.
    at: usize,
    /// The token as written (for messages).
    text: &'a str,
}

pub(super) struct Parser<'a> {
    text: &'a str,
    toks: Vec<Token<'a>>,
    pos: usize,
    depth: usize,
}

fn char_position(text: &str, byte: usize) -> usize {
    text[..byte.min(text.len())].chars().count() + 1
}

fn lex(text: &str) -> Result<Vec<Token<'_>>, ExprError> {
    let err = |at: usize, problem| ExprError {
        at: char_position(text, at),
        problem,
    };
    let bytes = text.as_bytes();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let start = i;
        let tok = match c {
            b' ' | b'\t' | b'\n' | b'\r' => {
                i += 1;
                continue;
            }
            b'(' | b')' | b',' | b'%' | b'=' => {
                i += 1;
                match c {
                    b'(' => Tok::LParen,
                    b')' => Tok::RParen,
                    b',' => Tok::Comma,
                    b'%' => Tok::Percent,
                    _ => Tok::Op(Op::Eq),
                }
            }
            b'!' if bytes.get(i + 1) == Some(&b'=') => {
                i += 2;
                Tok::Op(Op::Ne)
            }
            b'<' | b'>' => {
                let next = bytes.get(i + 1).copied();
                i += 1;
                let op = match (c, next) {
                    (b'<', Some(b'=')) => Op::Le,
                    (b'<', Some(b'>')) => Op::Ne,
                    (b'>', Some(b'=')) => Op::Ge,
                    (b'<', _) => Op::Lt,
                    _ => Op::Gt,
                };
                if matches!(op, Op::Le | Op::Ge) || (op == Op::Ne) {
                    i += 1;
                }
                Tok::Op(op)
            }
            b'\'' => {
                let mut s = String::new();
                i += 1;
                loop {
                    let Some(end) = text[i..].find('\'') else {
                        return Err(err(start, ExprProblem::UnterminatedString));
                    };
                    s.push_str(&text[i..i + end]);
                    i += end + 1;
                    if bytes.get(i) == Some(&b'\'') {
                        s.push('\'');
                        i += 1;
                    } else {
                        break;
                    }
                }
                Tok::Str(s)
            }
            b'"' => return Err(err(start, ExprProblem::DoubleQuoted)),
            b'0'..=b'9' | b'-' | b'+' | b'.' => {
                i += 1;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'.') {
                    i += 1;
                }
                let written = &text[start..i];
                match Decimal::parse(written.as_bytes()) {
                    Some(d) => Tok::Num(d),
                    None => return Err(err(start, ExprProblem::BadNumber(written.to_string()))),
                }
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                if i - start > MAX_FIELD_LEN {
                    return Err(err(start, ExprProblem::FieldTooLong));
                }
                Tok::Ident(&text[start..i])
            }
            _ => {
                let ch = text[i..].chars().next().unwrap_or('?');
                return Err(err(start, ExprProblem::UnexpectedChar(ch)));
            }
        };
        toks.push(Token {
            tok,
            at: start,
            text: &text[start..i],
        });
    }
    toks.push(Token {
        tok: Tok::End,
        at: text.len(),
        text: "",
    });
    Ok(toks)
}

const KEYWORDS: [&str; 4] = ["and", "or", "not", "in"];

impl<'a> Parser<'a> {
    pub(super) fn new(text: &'a str) -> Result<Parser<'a>, ExprError> {
        Ok(Parser {
            text,
            toks: lex(text)?,
            pos: 0,
            depth: 0,
        })
    }

    fn peek(&self) -> &Token<'a> {
        &self.toks[self.pos]
    }

    fn advance(&mut self) -> Token<'a> {
        let t = self.toks[self.pos].clone();
        if self.pos + 1 < self.toks.len() {
            self.pos += 1;
        }
        t
    }

    fn error_at(&self, byte: usize, problem: ExprProblem) -> ExprError {
        ExprError {
            at: char_position(self.text, byte),
            problem,
        }
    }

    fn error_here(&self, problem: ExprProblem) -> ExprError {
        self.error_at(self.peek().at, problem)
    }

    fn found(&self) -> String {
        match self.peek().tok {
            Tok::End => "the end".to_string(),
            _ => format!("'{}'", self.peek().text),
        }
    }

    fn is_keyword(&self, word: &str) -> bool {
        matches!(self.peek().tok, Tok::Ident(w) if w.eq_ignore_ascii_case(word))
    }

    pub(super) fn eat_keyword(&mut self, word: &str) -> bool {
        let yes = self.is_keyword(word);
        if yes {
            self.advance();
        }
        yes
    }

    fn eat(&mut self, tok: &Tok<'_>) -> bool {
        let yes = &self.peek().tok == tok;
        if yes {
            self.advance();
        }
        yes
    }

    pub(super) fn expect_end(&self, expected: &'static str) -> Result<(), ExprError> {
        match self.peek().tok {
            Tok::End => Ok(()),
            _ => Err(self.error_here(ExprProblem::ExpectedEnd {
                expected,
                found: self.found(),
            })),
        }
    }

    pub(super) fn or_expr(&mut self) -> Result<Node<String>, ExprError> {
        let mut left = self.and_expr()?;
        while self.eat_keyword("or") {
            left = Node::Or(Box::new(left), Box::new(self.and_expr()?));
        }
        Ok(left)
    }

    fn and_expr(&mut self) -> Result<Node<String>, ExprError> {
        let mut left = self.unary()?;
        while self.eat_keyword("and") {
            left = Node::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Node<String>, ExprError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.error_here(ExprProblem::TooDeep));
        }
        let node = if self.eat_keyword("not") {
            Node::Not(Box::new(self.unary()?))
        } else if self.eat(&Tok::LParen) {
            let inner = self.or_expr()?;
            if !self.eat(&Tok::RParen) {
                return Err(self.error_here(ExprProblem::ExpectedCloseParen(self.found())));
            }
            inner
        } else {
            self.comparison()?
        };
        self.depth -= 1;
        Ok(node)
    }

    fn field_name(&mut self) -> Result<String, ExprError> {
        match self.peek().tok {
            Tok::Ident(name) if !KEYWORDS.iter().any(|k| name.eq_ignore_ascii_case(k)) => {
                self.advance();
                Ok(name.to_string())
            }
            _ => Err(self.error_here(ExprProblem::ExpectedField(self.found()))),
        }
    }

    fn comparison(&mut self) -> Result<Node<String>, ExprError> {
        let field = self.field_name()?;
        let negated = self.eat_keyword("not");
        if negated && !self.is_keyword("in") {
            return Err(self.error_here(ExprProblem::ExpectedOperator {
                field: format!("{field} not"),
                found: self.found(),
            }));
        }
        if self.eat_keyword("in") {
            let values = self.in_list()?;
            let node = Node::In { field, values };
            return Ok(if negated {
                Node::Not(Box::new(node))
            } else {
                node
            });
        }
        let Tok::Op(op) = self.peek().tok else {
            return Err(self.error_here(ExprProblem::ExpectedOperator {
                field,
                found: self.found(),
            }));
        };
        self.advance();
        let value = match (self.peek().tok.clone(), op) {
            (Tok::Num(n), _) => Literal::Number(n),
            (Tok::Str(s), Op::Eq | Op::Ne) => Literal::Text(s),
            (Tok::Str(_), _) => {
                return Err(self.error_here(ExprProblem::ExpectedNumber(op.symbol())))
            }
            _ => return Err(self.error_here(ExprProblem::ExpectedValue(op.symbol()))),
        };
        self.advance();
        Ok(Node::Compare { field, op, value })
    }

    fn in_list(&mut self) -> Result<Vec<Literal>, ExprError> {
        if !self.eat(&Tok::LParen) {
            return Err(self.error_here(ExprProblem::ExpectedOpenParen("in")));
        }
        let mut values = Vec::new();
        loop {
            let after = if values.is_empty() { "(" } else { "," };
            let value = match self.peek().tok.clone() {
                Tok::Num(n) => Literal::Number(n),
                Tok::Str(s) => Literal::Text(s),
                _ => return Err(self.error_here(ExprProblem::ExpectedValue(after))),
            };
            self.advance();
            values.push(value);
            if self.eat(&Tok::RParen) {
                return Ok(values);
            }
            if !self.eat(&Tok::Comma) {
                return Err(self.error_here(ExprProblem::ExpectedListSeparator(self.found())));
            }
        }
    }

    pub(super) fn metric_function(&mut self) -> Result<MetricFunction, ExprError> {
        let Tok::Ident(name) = self.peek().tok else {
            return Err(self.error_here(ExprProblem::UnknownFunction(self.peek().text.into())));
        };
        let name_at = self.peek().at;
        self.advance();
        let lower = name.to_ascii_lowercase();
        if lower == "count" {
            // `count()` is accepted as today's configs may write it.
            if self.eat(&Tok::LParen) && !self.eat(&Tok::RParen) {
                return Err(self.error_here(ExprProblem::ExpectedCloseParen(self.found())));
            }
            return Ok(MetricFunction::Count);
        }
        let make: fn(String) -> MetricFunction = match lower.as_str() {
            "sum" => MetricFunction::Sum,
            "min" => MetricFunction::Min,
            "max" => MetricFunction::Max,
            "distinct" => MetricFunction::Distinct,
            "quantiles" => |field| MetricFunction::Quantiles {
                field,
                alpha: DEFAULT_ALPHA,
            },
            _ => {
                return Err(self.error_at(name_at, ExprProblem::UnknownFunction(name.into())));
            }
        };
        let keyword: &'static str = match lower.as_str() {
            "sum" => "sum",
            "min" => "min",
            "max" => "max",
            "distinct" => "distinct",
            _ => "quantiles",
        };
        if !self.eat(&Tok::LParen) {
            return Err(self.error_here(ExprProblem::ExpectedOpenParen(keyword)));
        }
        let mut function = make(self.field_name()?);
        if let MetricFunction::Quantiles { alpha, .. } = &mut function {
            if self.eat(&Tok::Comma) {
                *alpha = self.accuracy()?;
            }
        }
        if !self.eat(&Tok::RParen) {
            return Err(self.error_here(ExprProblem::ExpectedCloseParen(self.found())));
        }
        Ok(function)
    }

    /// `0.5%` → 0.005.
    fn accuracy(&mut self) -> Result<f64, ExprError> {
        let at = self.peek().at;
        let bad = |p: &Parser<'_>| p.error_at(at, ExprProblem::BadAccuracy(p.found()));
        let Tok::Num(Decimal(units)) = self.peek().tok else {
            return Err(bad(self));
        };
        let number = self.peek().text;
        let written = self.found();
        self.advance();
        if !self.eat(&Tok::Percent) {
            return Err(self.error_at(at, ExprProblem::BadAccuracy(written)));
        }
        // Exact integers divided once: the nearest f64 to the written percentage / 100.
        let alpha = units as f64 / (Decimal::ONE as f64 * 100.0);
        if !(MIN_ALPHA..=MAX_ALPHA).contains(&alpha) {
            return Err(self.error_at(at, ExprProblem::BadAccuracy(format!("'{number}%'"))));
        }
        Ok(alpha)
    }
}
