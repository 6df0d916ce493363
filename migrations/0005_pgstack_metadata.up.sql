-- pgstack's own key/value facts about this database. `environment` is written
-- after every migration run; `cargo xtask db-reset` refuses a database whose
-- environment is `production`. pgstack-migrations creates the same table on
-- demand (METADATA_TABLE_SQL), hence IF NOT EXISTS.
CREATE TABLE IF NOT EXISTS pgstack_metadata (
    key        text        PRIMARY KEY CHECK (key <> ''),
    value      text        NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
