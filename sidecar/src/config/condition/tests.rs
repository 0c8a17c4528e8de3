use super::*;
use proptest::prelude::*;

const FIELDS: [&str; 4] = ["ev", "status", "rt", "uid"];

/// Evaluates `cond` on values given as (field, value) pairs; others absent.
fn check(cond: &str, values: &[(&str, &str)]) -> Outcome {
    let bound = parse_condition(cond).unwrap().bind(&FIELDS).unwrap();
    let mut record: [Option<&[u8]>; 4] = [None; 4];
    for (name, v) in values {
        let i = FIELDS.iter().position(|f| f == name).unwrap();
        record[i] = Some(v.as_bytes());
    }
    bound.eval(&record)
}

fn yes(cond: &str, values: &[(&str, &str)]) -> bool {
    check(cond, values).matched
}

const MATCH: Outcome = Outcome {
    matched: true,
    bad_number: false,
};
const NO: Outcome = Outcome {
    matched: false,
    bad_number: false,
};
const BAD: Outcome = Outcome {
    matched: false,
    bad_number: true,
};

fn error(text: &str) -> String {
    parse_condition(text).unwrap_err().to_string()
}

fn metric_error(text: &str) -> String {
    parse_metric(text).unwrap_err().to_string()
}

#[test]
fn strings_compare_bytes_and_absent_is_empty() {
    assert!(yes("ev = 'view'", &[("ev", "view")]));
    assert!(!yes("ev = 'view'", &[("ev", "View")]));
    assert!(!yes("ev = 'view'", &[]));
    assert!(yes("ev = ''", &[]));
    assert!(yes("ev != 'view'", &[]));
    assert!(yes("ev <> 'view'", &[("ev", "click")]));
    assert!(yes("ev = 'it''s'", &[("ev", "it's")]));
    assert!(yes("ev = 'é'", &[("ev", "é")]));
}

#[test]
fn numbers_compare_exact_decimals() {
    assert_eq!(check("status < 400", &[("status", "200")]), MATCH);
    assert_eq!(check("status < 400", &[("status", "404")]), NO);
    assert_eq!(check("status = 200", &[("status", "200.000")]), MATCH);
    assert_eq!(check("rt >= 0.1", &[("rt", "0.100000001")]), MATCH);
    assert_eq!(check("rt > 0.1", &[("rt", "0.1")]), NO);
    assert_eq!(check("rt <= -1", &[("rt", "-1")]), MATCH);
    // A non-number: unknown, reported; an empty value: unknown, not reported.
    assert_eq!(check("status < 400", &[("status", "-")]), BAD);
    assert_eq!(check("status != 400", &[("status", "abc")]), BAD);
    assert_eq!(check("status < 400", &[("status", "")]), NO);
    assert_eq!(check("status < 400", &[]), NO);
}

#[test]
fn upstream_lists_compare_as_their_sum() {
    assert_eq!(check("rt > 0.5", &[("rt", "0.300, 0.400")]), MATCH);
    assert_eq!(check("rt > 0.5", &[("rt", "0.1 : -")]), NO);
    assert_eq!(check("rt = 3", &[("rt", "1 : 2")]), MATCH);
    assert_eq!(check("rt > 0", &[("rt", "-, -")]), BAD);
}

#[test]
fn three_valued_logic_as_sql() {
    let bad_rt = [("rt", "-"), ("ev", "view")];
    assert_eq!(check("not (rt > 1)", &bad_rt), BAD);
    assert_eq!(check("rt <= 1", &bad_rt), BAD);
    assert_eq!(
        check("ev = 'view' or rt > 1", &bad_rt),
        MATCH,
        "not evaluated"
    );
    assert_eq!(
        check("rt > 1 or ev = 'view'", &bad_rt),
        Outcome {
            matched: true,
            bad_number: true
        }
    );
    assert_eq!(
        check("ev = 'click' and rt > 1", &bad_rt),
        NO,
        "not evaluated"
    );
    assert_eq!(check("rt > 1 and ev = 'click'", &bad_rt), BAD);
    assert_eq!(
        check("not (rt > 1 and ev = 'click')", &bad_rt),
        Outcome {
            matched: true,
            bad_number: true
        }
    );
}

#[test]
fn in_lists_and_precedence() {
    assert!(yes("ev in ('view', 'click')", &[("ev", "click")]));
    assert!(!yes("ev in ('view', 'click')", &[("ev", "buy")]));
    assert!(yes("ev not in ('view')", &[("ev", "buy")]));
    assert!(yes("status in (200, 304)", &[("status", "304.0")]));
    assert_eq!(check("status in (200, 304)", &[("status", "x")]), BAD);
    assert_eq!(check("status in ('x', 304)", &[("status", "x")]), MATCH);
    // and binds tighter than or, not tighter than and; keywords in any case.
    let c = "ev = 'a' or ev = 'b' and status = 1";
    assert!(yes(c, &[("ev", "a"), ("status", "2")]));
    assert!(!yes(c, &[("ev", "b"), ("status", "2")]));
    assert!(yes(
        "ev = 'a' AND NOT status >= 500",
        &[("ev", "a"), ("status", "404")]
    ));
    assert!(yes(
        "(ev = 'a' or ev = 'b') and status = 1",
        &[("ev", "b"), ("status", "1")]
    ));
}

#[test]
fn errors_name_the_position_and_the_problem() {
    assert_eq!(error("ev = "), "at 6: expected a value after '='");
    assert_eq!(
        error("status < 'a'"),
        "at 10: expected a number after '<' (only =, != and in compare strings)"
    );
    assert_eq!(
        error("ev = 'abc"),
        "at 6: unterminated string (a quote inside a string is written '')"
    );
    assert_eq!(error("ev == 'a'"), "at 5: expected a value after '='");
    assert_eq!(error("(ev = 'a'"), "at 10: expected ')', found the end");
    assert_eq!(
        error("ev = 'a' xor 1"),
        "at 10: expected 'and', 'or' or the end, found 'xor'"
    );
    assert_eq!(
        error("ev 'a'"),
        "at 4: expected an operator (=, !=, <, <=, >, >=, in) after 'ev', found ''a''"
    );
    assert_eq!(error("and = 1"), "at 1: expected a field name, found 'and'");
    assert_eq!(error(""), "at 1: expected a field name, found the end");
    assert_eq!(
        error("rt > 1e3"),
        "at 6: bad number '1e3' (expected digits, an optional '.' and at most 9 decimals)"
    );
    assert_eq!(
        error("ev = \"a\""),
        "at 6: strings are written in single quotes"
    );
    assert_eq!(
        error("ev = 'é' and"),
        "at 13: expected a field name, found the end"
    );
    assert_eq!(error("é = 1"), "at 1: unexpected character 'é'");
    assert_eq!(error("ev in 'a'"), "at 7: expected '(' after 'in'");
    assert_eq!(
        error("ev in ('a' 'b')"),
        "at 12: expected ',' or ')' in the list, found ''b''"
    );
    assert_eq!(error("ev in ()"), "at 8: expected a value after '('");
    assert_eq!(
        error(&"(".repeat(40)),
        "at 33: nested deeper than 32 levels"
    );
    assert_eq!(
        error(&format!("{} = 1", "f".repeat(64))),
        "at 1: field name longer than 63 bytes"
    );
}

#[test]
fn metric_expressions() {
    let m = |t: &str| parse_metric(t).unwrap();
    assert_eq!(m("count").function, MetricFunction::Count);
    assert_eq!(m(" count() ").function, MetricFunction::Count);
    assert_eq!(
        m("sum(bytes)").function,
        MetricFunction::Sum("bytes".into())
    );
    assert_eq!(m("min( rt )").function, MetricFunction::Min("rt".into()));
    assert_eq!(m("max(rt)").function, MetricFunction::Max("rt".into()));
    assert_eq!(
        m("distinct(uid)").function,
        MetricFunction::Distinct("uid".into())
    );
    assert_eq!(
        m("quantiles(rt)").function,
        MetricFunction::Quantiles {
            field: "rt".into(),
            alpha: DEFAULT_ALPHA
        }
    );
    assert_eq!(
        m("quantiles(rt, 0.5%)").function,
        MetricFunction::Quantiles {
            field: "rt".into(),
            alpha: 0.005
        }
    );
    let views = m("count where ev = 'view'");
    assert_eq!(views.filter.unwrap().to_string(), "ev = 'view'");
    let bytes = m("sum(bytes) where ev in ('view', 'click')");
    assert_eq!(bytes.filter.unwrap().fields(), ["ev"]);
    assert!(m("count").filter.is_none());
}

#[test]
fn metric_errors() {
    assert_eq!(
        metric_error("count where ev ="),
        "at 17: expected a value after '='"
    );
    assert_eq!(
            metric_error("avg(rt)"),
            "at 1: unknown function \"avg\" (expected count, sum(f), min(f), max(f), distinct(f), quantiles(f))"
        );
    assert_eq!(metric_error("sum(rt"), "at 7: expected ')', found the end");
    assert_eq!(metric_error("sum rt"), "at 5: expected '(' after 'sum'");
    assert_eq!(metric_error("sum(rt, 1%)"), "at 7: expected ')', found ','");
    assert_eq!(
        metric_error("count where"),
        "at 12: expected a field name, found the end"
    );
    assert_eq!(
        metric_error("count ev = 1"),
        "at 7: expected 'where' or the end, found 'ev'"
    );
    let accuracy = "expected a relative accuracy from 0.01% to 10% (e.g. 0.5%)";
    assert_eq!(
        metric_error("quantiles(rt, 0.5)"),
        format!("at 15: {accuracy}, found '0.5'")
    );
    assert_eq!(
        metric_error("quantiles(rt, 20%)"),
        format!("at 15: {accuracy}, found '20%'")
    );
    assert_eq!(
        metric_error("quantiles(rt, x)"),
        format!("at 15: {accuracy}, found 'x'")
    );
}

#[test]
fn binding_resolves_fields_once() {
    let c = parse_condition("uid = 'a' or ev = 'b' or uid = 'c'").unwrap();
    assert_eq!(c.fields(), ["uid", "ev"]);
    assert_eq!(c.bind(&["ev"]), Err(UnknownField("uid".into())));
    assert_eq!(
        c.bind(&["ev"]).unwrap_err().to_string(),
        "unknown field \"uid\""
    );
    // A field mapped past the record reads as absent.
    let lenient = c
        .bind_with(|f| Some(if f == "ev" { 0 } else { usize::MAX }))
        .unwrap();
    assert!(lenient.eval(&[Some(b"b")]).matched);
    assert!(!lenient.eval(&[Some(b"x")]).matched);
}

#[test]
fn display_is_canonical() {
    for (text, canonical) in [
        (
            "ev='a' AND (status<400 OR rt>=1.50)",
            "ev = 'a' and (status < 400 or rt >= 1.5)",
        ),
        ("not not ev = 'it''s'", "not not ev = 'it''s'"),
        ("ev not in ('a','b')", "not ev in ('a', 'b')"),
        ("a = 1 and (b = 2 and c = 3)", "a = 1 and (b = 2 and c = 3)"),
        ("not (a = 1 or b <> 2)", "not (a = 1 or b != 2)"),
    ] {
        assert_eq!(parse_condition(text).unwrap().to_string(), canonical);
    }
    for text in [
        "quantiles(rt, 0.5%) where ev = 'x'",
        "count",
        "distinct(uid)",
        "quantiles(rt)",
    ] {
        assert_eq!(parse_metric(text).unwrap().to_string(), text);
    }
}

fn literal() -> impl Strategy<Value = Literal> {
    prop_oneof![
        "[a-z' é]{0,4}".prop_map(Literal::Text),
        (-5000i128..5000).prop_map(|v| Literal::Number(Decimal(v * 250_000_000))),
    ]
}

fn tree() -> impl Strategy<Value = Node<String>> {
    let field = prop::sample::select(FIELDS.to_vec()).prop_map(String::from);
    let op = prop::sample::select(vec![Op::Eq, Op::Ne, Op::Lt, Op::Le, Op::Gt, Op::Ge]);
    let leaf = prop_oneof![
        (field.clone(), op, literal()).prop_map(|(field, op, value)| {
            // `<`-style comparisons take numbers only.
            let value = match (op, value) {
                (Op::Eq | Op::Ne, v) | (_, v @ Literal::Number(_)) => v,
                (_, Literal::Text(_)) => Literal::Number(Decimal(0)),
            };
            Node::Compare { field, op, value }
        }),
        (field, prop::collection::vec(literal(), 1..4))
            .prop_map(|(field, values)| Node::In { field, values }),
    ];
    leaf.prop_recursive(4, 24, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| Node::And(Box::new(a), Box::new(b))),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| Node::Or(Box::new(a), Box::new(b))),
            inner.prop_map(|a| Node::Not(Box::new(a))),
        ]
    })
}

fn record() -> impl Strategy<Value = Vec<Option<String>>> {
    let value = prop_oneof![
        Just(None),
        "[a-z' é]{0,3}".prop_map(Some),
        (-3000i32..3000).prop_map(|v| Some(format!("{}", f64::from(v) / 4.0))),
        Just(Some("-".to_string())),
        Just(Some("0.5, 1 : -".to_string())),
    ];
    prop::collection::vec(value, 4)
}

fn eval_tree(root: &Node<String>, rec: &[Option<String>]) -> Outcome {
    let bound = Condition { root: root.clone() }.bind(&FIELDS).unwrap();
    let values: Vec<Option<&[u8]>> = rec
        .iter()
        .map(|v| v.as_deref().map(str::as_bytes))
        .collect();
    bound.eval(&values)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn display_parses_back(root in tree()) {
        let c = Condition { root };
        prop_assert_eq!(parse_condition(&c.to_string()).unwrap(), c);
    }

    /// SQL's three-valued laws: double negation, De Morgan, `!=` is `not =`.
    #[test]
    fn negation_laws(a in tree(), b in tree(), rec in record()) {
        let not = |n: Node<String>| Node::Not(Box::new(n));
        let x = eval_tree(&a, &rec).matched;
        prop_assert_eq!(eval_tree(&not(not(a.clone())), &rec).matched, x);
        let and = Node::And(Box::new(a.clone()), Box::new(b.clone()));
        let demorgan = Node::Or(Box::new(not(a.clone())), Box::new(not(b.clone())));
        prop_assert_eq!(eval_tree(&not(and), &rec).matched, eval_tree(&demorgan, &rec).matched);
        if let Node::Compare { field, op: Op::Eq, value } = &a {
            let ne = Node::Compare { field: field.clone(), op: Op::Ne, value: value.clone() };
            prop_assert_eq!(eval_tree(&ne, &rec), eval_tree(&not(a.clone()), &rec));
        }
        // An event matches `c` or `not c` or neither (unknown), never both.
        prop_assert!(!(x && eval_tree(&not(a.clone()), &rec).matched));
    }
}
