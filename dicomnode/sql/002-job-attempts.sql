-- Schema 2: how often a job's inference worker crashed (for [inference] crash_retries).
ALTER TABLE jobs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
