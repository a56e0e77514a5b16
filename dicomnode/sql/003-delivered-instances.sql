-- Schema 3: which result instances each destination has acknowledged, so a retry sends only the
-- others. Rows go with their delivery (a purge, or new results for the job).
CREATE TABLE delivered_instances (
    job_id INTEGER NOT NULL,
    destination TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (job_id, destination, sop_instance_uid),
    FOREIGN KEY (job_id, destination) REFERENCES deliveries(job_id, destination) ON DELETE CASCADE
);
