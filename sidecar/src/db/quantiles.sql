-- logtally's quantile sketches in plain PostgreSQL (no extension, no C: also for Citus).
--
-- A `quantiles(field)` metric column has type logtally_quantiles: a DDSketch-style histogram
-- (sidecar/src/aggregate/quantiles.rs). With relative accuracy alpha, gamma =
-- (1 + alpha) / (1 - alpha); a value x > 0 is counted in bucket k = ceil(ln x / ln gamma) of
-- the positive side, x < 0 in bucket k of |x| on the negative side, |x| < 1e-9 in `zero`.
-- Only non-empty buckets are stored, keys ascending, counts > 0. Bucket k stands for
-- 2 * gamma^k / (1 + gamma).
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

-- One side's buckets of two sketches added: keys ascending, counts summed.
CREATE OR REPLACE FUNCTION logtally_quantiles_side_add(
    a_keys int4[], a_counts int8[], b_keys int4[], b_counts int8[],
    OUT keys int4[], OUT counts int8[])
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(array_agg(k ORDER BY k), '{}'), coalesce(array_agg(c ORDER BY k), '{}')
    FROM (
        SELECT k, sum(c)::int8 AS c
        FROM (
            SELECT * FROM unnest(a_keys, a_counts) AS a(k, c)
            UNION ALL
            SELECT * FROM unnest(b_keys, b_counts) AS b(k, c)
        ) AS both_sides
        GROUP BY k
    ) AS summed
$$;

-- The merge of two sketches (NULL is the empty sketch): used in the upsert,
-- `ON CONFLICT ... DO UPDATE SET rt = logtally_quantiles_add(t.rt, excluded.rt)`.
CREATE OR REPLACE FUNCTION logtally_quantiles_add(a logtally_quantiles, b logtally_quantiles)
RETURNS logtally_quantiles
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    r logtally_quantiles;
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
    SELECT s.keys, s.counts INTO r.pos_keys, r.pos_counts
        FROM logtally_quantiles_side_add(a.pos_keys, a.pos_counts, b.pos_keys, b.pos_counts) AS s;
    SELECT s.keys, s.counts INTO r.neg_keys, r.neg_counts
        FROM logtally_quantiles_side_add(a.neg_keys, a.neg_counts, b.neg_keys, b.neg_counts) AS s;
    RETURN r;
END
$$;

-- The merge of every row's sketch: logtally_quantile(logtally_quantiles_merge(rt), 0.99).
CREATE OR REPLACE AGGREGATE logtally_quantiles_merge(logtally_quantiles) (
    SFUNC = logtally_quantiles_add,
    STYPE = logtally_quantiles,
    COMBINEFUNC = logtally_quantiles_add,
    PARALLEL = SAFE
);

-- The estimate of quantile q (0..1): the value of the bucket holding the value of 0-based
-- rank floor(q * (n - 1)) in sorted order. NULL for an empty sketch or q outside 0..1.
CREATE OR REPLACE FUNCTION logtally_quantile(s logtally_quantiles, q float8)
RETURNS float8
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    WITH buckets AS (
        -- Sorted order: the most negative first (negative keys descending), zero, positive.
        SELECT -1 AS side, k, -k AS sort_key, c FROM unnest(s.neg_keys, s.neg_counts) AS n(k, c)
        UNION ALL
        SELECT 0, 0, 0, s.zero WHERE s.zero > 0
        UNION ALL
        SELECT 1, k, k, c FROM unnest(s.pos_keys, s.pos_counts) AS p(k, c)
    ), ranked AS (
        SELECT side, k, sort_key,
               sum(c) OVER (ORDER BY side, sort_key ROWS UNBOUNDED PRECEDING) AS cumulative,
               sum(c) OVER () AS n
        FROM buckets
    )
    SELECT CASE side
               WHEN 0 THEN 0::float8
               WHEN 1 THEN 2 * power(g, k::float8) / (1 + g)
               ELSE -(2 * power(g, k::float8) / (1 + g))
           END
    FROM ranked, (SELECT (1 + s.alpha) / (1 - s.alpha) AS g) AS gamma
    WHERE q >= 0 AND q <= 1 AND cumulative::float8 > q * (n - 1)::float8
    ORDER BY side, sort_key
    LIMIT 1
$$;
