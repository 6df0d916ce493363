-- Who sponsors which bill; exactly one sponsor of a bill may be its primary sponsor.
CREATE TABLE bill_sponsors (
    bill_id    bigint      NOT NULL REFERENCES bills (id) ON DELETE CASCADE,
    sponsor_id bigint      NOT NULL REFERENCES sponsors (id) ON DELETE RESTRICT,
    is_primary boolean     NOT NULL DEFAULT false,
    joined_on  date,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (bill_id, sponsor_id)
);

-- At most one primary sponsor per bill.
CREATE UNIQUE INDEX bill_sponsors_one_primary_idx ON bill_sponsors (bill_id) WHERE is_primary;
-- "Bills sponsored by X" without scanning the primary key.
CREATE INDEX bill_sponsors_sponsor_id_idx ON bill_sponsors (sponsor_id);
