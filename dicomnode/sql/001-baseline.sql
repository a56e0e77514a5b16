-- Schema 1: the journal's tables as first released. IF NOT EXISTS: a journal written before
-- PRAGMA user_version numbered the schema already has them, and this file leaves them as they are.
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    calling_aet TEXT,
    received_at REAL NOT NULL,
    images_in_acquisition INTEGER,
    number_of_frames INTEGER,
    position TEXT
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 1,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    last_instance_at REAL NOT NULL,
    completed_at REAL,
    completion TEXT,
    rule TEXT,
    reason TEXT,
    error TEXT,
    output_dir TEXT,
    outputs INTEGER,
    timings TEXT,
    purged_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_series ON jobs(series_uid);
CREATE TABLE IF NOT EXISTS deliveries (
    job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    destination TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    first_attempt_at REAL,
    next_attempt_at REAL NOT NULL,
    delivered_at REAL,
    last_error TEXT,
    PRIMARY KEY (job_id, destination)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    job_id INTEGER,
    kind TEXT NOT NULL,
    detail TEXT
);

INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', '1');
