DROP TABLE IF EXISTS pgstack_metadata;
