-- logtally's quantile sketches in plain PostgreSQL (no extension, no C: also for Citus).
--
-- A `quantiles(field)` metric column has type logtally_quantiles: a DDSketch-style histogram
-- (sidecar/src/aggregate/quantiles.rs). With relative accuracy alpha, gamma =
-- (1 + alpha) / (1 - alpha); a value x > 0 is counted in bucket k = ceil(ln x / ln gamma) of
-- the positive side, x < 0 in bucket k of |x| on the negative side, |x| < 1e-9 in `zero`.
-- Only non-empty buckets are stored, keys ascending, counts > 0; a side without buckets is
-- NULL (or '{}'). Bucket k stands for 2 * gamma^k / (1 + gamma).
--
-- Installed by the sidecar; every statement can run again (idempotent).

DO $$
BEGIN
    IF to_regtype('logtally_quantiles') IS NULL THEN
        CREATE TYPE logtally_quantiles AS (
            alpha      float8,
            zero       int8,
            pos_keys   int4[],
            pos_counts int8[],
            neg_keys   int4[],
            neg_counts int8[]
        );
    END IF;
END
$$;

-- The merge of two sketches (NULL is the empty sketch): used in the upsert,
-- `ON CONFLICT ... DO UPDATE SET rt = logtally_quantiles_add(t.rt, excluded.rt)`.
-- A linear merge of the sorted sides in PL/pgSQL without SQL statements: measured ~10 us for
-- small sketches, where unnest/GROUP BY/array_agg cost ~100-200 us a call.
CREATE OR REPLACE FUNCTION logtally_quantiles_add(a logtally_quantiles, b logtally_quantiles)
RETURNS logtally_quantiles
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    r logtally_quantiles;
    ak int4[]; ac int8[]; bk int4[]; bc int8[]; rk int4[]; rc int8[];
    i int; j int; na int; nb int; side int;
BEGIN
    IF a.alpha IS NULL THEN
        RETURN b;
    END IF;
    IF b.alpha IS NULL THEN
        RETURN a;
    END IF;
    IF a.alpha <> b.alpha THEN
        RAISE EXCEPTION 'logtally_quantiles_add: cannot merge sketches of relative accuracy % and %',
            a.alpha, b.alpha;
    END IF;
    r.alpha := a.alpha;
    r.zero := a.zero + b.zero;
    FOR side IN 1..2 LOOP
        IF side = 1 THEN
            ak := a.pos_keys; ac := a.pos_counts; bk := b.pos_keys; bc := b.pos_counts;
        ELSE
            ak := a.neg_keys; ac := a.neg_counts; bk := b.neg_keys; bc := b.neg_counts;
        END IF;
        na := coalesce(cardinality(ak), 0);
        nb := coalesce(cardinality(bk), 0);
        IF nb = 0 THEN
            rk := ak; rc := ac;
        ELSIF na = 0 THEN
            rk := bk; rc := bc;
        ELSE
            rk := '{}'; rc := '{}'; i := 1; j := 1;
            WHILE i <= na OR j <= nb LOOP
                IF j > nb OR (i <= na AND ak[i] < bk[j]) THEN
                    rk := rk || ak[i]; rc := rc || ac[i]; i := i + 1;
                ELSIF i > na OR bk[j] < ak[i] THEN
                    rk := rk || bk[j]; rc := rc || bc[j]; j := j + 1;
                ELSE
                    rk := rk || ak[i]; rc := rc || (ac[i] + bc[j]); i := i + 1; j := j + 1;
                END IF;
            END LOOP;
        END IF;
        IF cardinality(rk) = 0 THEN
            rk := NULL; rc := NULL;
        END IF;
        IF side = 1 THEN
            r.pos_keys := rk; r.pos_counts := rc;
        ELSE
            r.neg_keys := rk; r.neg_counts := rc;
        END IF;
    END LOOP;
    RETURN r;
END
$$;

-- The aggregate's state: the sides gathered from the rows, unsorted and with repeated keys
-- until compacted (sorted, keys summed) — rarely: when they grew past twice their compacted
-- size plus 4096 buckets. So a row costs a few microseconds, and memory stays a few times
-- the distinct buckets.
DO $$
BEGIN
    IF to_regtype('logtally_quantiles_gather') IS NULL THEN
        CREATE TYPE logtally_quantiles_gather AS (
            sketch    logtally_quantiles,
            compacted int4
        );
    END IF;
END
$$;

-- Sorted sides with keys summed (NULL when a side has no bucket).
CREATE OR REPLACE FUNCTION logtally_quantiles_compact(s logtally_quantiles)
RETURNS logtally_quantiles
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    r logtally_quantiles := s;
BEGIN
    SELECT array_agg(k ORDER BY k), array_agg(c ORDER BY k) INTO r.pos_keys, r.pos_counts
        FROM (SELECT k, sum(c)::int8 AS c FROM unnest(s.pos_keys, s.pos_counts) AS u(k, c)
              GROUP BY k) AS summed;
    SELECT array_agg(k ORDER BY k), array_agg(c ORDER BY k) INTO r.neg_keys, r.neg_counts
        FROM (SELECT k, sum(c)::int8 AS c FROM unnest(s.neg_keys, s.neg_counts) AS u(k, c)
              GROUP BY k) AS summed;
    RETURN r;
END
$$;

CREATE OR REPLACE FUNCTION logtally_quantiles_gather_add(
    st logtally_quantiles_gather, x logtally_quantiles)
RETURNS logtally_quantiles_gather
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    s logtally_quantiles := st.sketch;
    size int4;
BEGIN
    IF x.alpha IS NULL THEN
        RETURN st;
    END IF;
    IF s.alpha IS NULL THEN
        RETURN ROW(x, 0)::logtally_quantiles_gather;
    END IF;
    IF s.alpha <> x.alpha THEN
        RAISE EXCEPTION 'logtally_quantiles_merge: cannot merge sketches of relative accuracy % and %',
            s.alpha, x.alpha;
    END IF;
    s.zero := s.zero + x.zero;
    s.pos_keys := s.pos_keys || x.pos_keys;
    s.pos_counts := s.pos_counts || x.pos_counts;
    s.neg_keys := s.neg_keys || x.neg_keys;
    s.neg_counts := s.neg_counts || x.neg_counts;
    size := coalesce(cardinality(s.pos_keys), 0) + coalesce(cardinality(s.neg_keys), 0);
    IF size > 2 * st.compacted + 4096 THEN
        s := logtally_quantiles_compact(s);
        size := coalesce(cardinality(s.pos_keys), 0) + coalesce(cardinality(s.neg_keys), 0);
        RETURN ROW(s, size)::logtally_quantiles_gather;
    END IF;
    RETURN ROW(s, st.compacted)::logtally_quantiles_gather;
END
$$;

CREATE OR REPLACE FUNCTION logtally_quantiles_gather_combine(
    a logtally_quantiles_gather, b logtally_quantiles_gather)
RETURNS logtally_quantiles_gather
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    IF (b.sketch).alpha IS NULL THEN
        RETURN a;
    END IF;
    RETURN logtally_quantiles_gather_add(a, b.sketch);
END
$$;

CREATE OR REPLACE FUNCTION logtally_quantiles_gather_final(st logtally_quantiles_gather)
RETURNS logtally_quantiles
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    IF (st.sketch).alpha IS NULL THEN
        RETURN NULL;
    END IF;
    RETURN logtally_quantiles_compact(st.sketch);
END
$$;

-- The merge of every row's sketch: logtally_quantile(logtally_quantiles_merge(rt), 0.99).
-- NULL over no rows (or only NULLs). Partial aggregates combine (parallel plans, Citus).
CREATE OR REPLACE AGGREGATE logtally_quantiles_merge(logtally_quantiles) (
    SFUNC = logtally_quantiles_gather_add,
    STYPE = logtally_quantiles_gather,
    FINALFUNC = logtally_quantiles_gather_final,
    COMBINEFUNC = logtally_quantiles_gather_combine,
    PARALLEL = SAFE
);

-- The estimate of quantile q (0..1): the value of the bucket holding the value of 0-based
-- rank floor(q * (n - 1)) in sorted order (the most negative first). NULL for an empty sketch
-- or q outside 0..1. Same operations as the Rust sketch, so the same float8 to the bit.
CREATE OR REPLACE FUNCTION logtally_quantile(s logtally_quantiles, q float8)
RETURNS float8
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    pk int4[] := s.pos_keys; pc int8[] := s.pos_counts;
    nk int4[] := s.neg_keys; nc int8[] := s.neg_counts;
    n int8 := coalesce(s.zero, 0);
    cumulative int8 := 0;
    c int8; i int; rank float8; g float8;
BEGIN
    IF s.alpha IS NULL OR q IS NULL OR q < 0 OR q > 1 THEN
        RETURN NULL;
    END IF;
    FOREACH c IN ARRAY coalesce(pc, '{}') LOOP n := n + c; END LOOP;
    FOREACH c IN ARRAY coalesce(nc, '{}') LOOP n := n + c; END LOOP;
    IF n = 0 THEN
        RETURN NULL;
    END IF;
    rank := q * (n - 1)::float8;
    g := (1 + s.alpha) / (1 - s.alpha);
    FOR i IN REVERSE coalesce(cardinality(nk), 0)..1 LOOP
        cumulative := cumulative + nc[i];
        IF cumulative::float8 > rank THEN
            RETURN -(2 * power(g, nk[i]::float8) / (1 + g));
        END IF;
    END LOOP;
    cumulative := cumulative + coalesce(s.zero, 0);
    IF cumulative::float8 > rank THEN
        RETURN 0;
    END IF;
    FOR i IN 1..coalesce(cardinality(pk), 0) LOOP
        cumulative := cumulative + pc[i];
        IF cumulative::float8 > rank THEN
            RETURN 2 * power(g, pk[i]::float8) / (1 + g);
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;
