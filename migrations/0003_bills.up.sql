-- Bills and where they stand.
CREATE TYPE bill_status AS ENUM (
    'introduced',
    'in_committee',
    'passed_house',
    'passed_senate',
    'enacted',
    'vetoed',
    'failed'
);

CREATE TABLE bills (
    id            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The session (e.g. the 118th Congress) and the number within it ("H.R. 1234").
    session       smallint    NOT NULL,
    number        text        NOT NULL,
    title         text        NOT NULL,
    summary       text,
    status        bill_status NOT NULL DEFAULT 'introduced',
    introduced_on date        NOT NULL,
    -- The user who entered the bill; kept when the account goes away.
    created_by    bigint      REFERENCES users (id) ON DELETE SET NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT bills_session_number_key UNIQUE (session, number),
    CONSTRAINT bills_session_positive CHECK (session > 0),
    CONSTRAINT bills_number_not_blank CHECK (btrim(number) <> ''),
    CONSTRAINT bills_title_not_blank CHECK (btrim(title) <> '')
);

CREATE INDEX bills_status_idx ON bills (status);
CREATE INDEX bills_introduced_on_idx ON bills (introduced_on DESC);
CREATE INDEX bills_created_by_idx ON bills (created_by) WHERE created_by IS NOT NULL;
