-- Legislators who sponsor bills.
CREATE TABLE sponsors (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The official identifier (e.g. the Bioguide ID), unique when known.
    external_id text,
    full_name   text        NOT NULL,
    party       text,
    state       char(2)     NOT NULL,
    chamber     text        NOT NULL,
    district    smallint,
    active      boolean     NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT sponsors_external_id_key UNIQUE (external_id),
    CONSTRAINT sponsors_full_name_not_blank CHECK (btrim(full_name) <> ''),
    CONSTRAINT sponsors_state_format CHECK (state ~ '^[A-Z]{2}$'),
    CONSTRAINT sponsors_chamber_known CHECK (chamber IN ('house', 'senate')),
    -- Senators have no district; representatives have one (0 for at-large seats).
    CONSTRAINT sponsors_district_matches_chamber CHECK (
        (chamber = 'senate' AND district IS NULL)
        OR (chamber = 'house' AND district IS NOT NULL AND district >= 0)
    )
);

CREATE INDEX sponsors_state_chamber_idx ON sponsors (state, chamber);
CREATE INDEX sponsors_full_name_idx ON sponsors (lower(full_name));
