-- Scene catalogue, as in the JRC CbM reference database, plus what the engine needs to read the
-- scenes back (one row per band file) and a per-dataset job queue for parallel workers.
-- Placeholders in braces are identifiers filled in (quoted) by `cbm db init`.

CREATE TABLE IF NOT EXISTS {catalogue} (
    id serial PRIMARY KEY,
    obstime timestamp,
    reference varchar(120) NOT NULL UNIQUE,
    sensor char(2),
    card char(2),
    status varchar(24) DEFAULT 'ingested',
    footprint geometry(Polygon, 4326)
);
CREATE INDEX IF NOT EXISTS {catalogue_footprint_index} ON {catalogue} USING gist (footprint);

-- Additions to the reference table: readers of the reference columns are unaffected.
ALTER TABLE {catalogue} ADD COLUMN IF NOT EXISTS orbit text;
ALTER TABLE {catalogue} ADD COLUMN IF NOT EXISTS sensor_name text;

CREATE TABLE IF NOT EXISTS {catalogue_bands} (
    catalogue_id integer NOT NULL REFERENCES {catalogue} (id) ON DELETE CASCADE,
    band text NOT NULL,
    uri text NOT NULL,
    nodata double precision,
    scale double precision,
    "offset" double precision,
    PRIMARY KEY (catalogue_id, band)
);

-- One row per (dataset, scene): the queue that FOR UPDATE SKIP LOCKED claims from.
CREATE TABLE IF NOT EXISTS {jobs} (
    dataset text NOT NULL,
    catalogue_id integer NOT NULL REFERENCES {catalogue} (id) ON DELETE CASCADE,
    status varchar(24) NOT NULL DEFAULT 'ingested',
    worker text,
    claimed_at timestamptz,
    PRIMARY KEY (dataset, catalogue_id)
);
CREATE INDEX IF NOT EXISTS {jobs_status_index} ON {jobs} (dataset, status);
