-- Signature and SCL histogram tables of one dataset (aoi/year), columns as in the JRC reference
-- database. obsid is {catalogue}.id. Statistics are double precision so values round-trip exactly;
-- band compares bytewise (COLLATE "C": band names are ASCII), which makes the key cheaper to index.

CREATE TABLE IF NOT EXISTS {signatures} (
    pid bigint NOT NULL,
    obsid integer NOT NULL,
    band text COLLATE "C" NOT NULL,
    count integer,
    mean double precision,
    std double precision,
    min double precision,
    max double precision,
    p25 double precision,
    p50 double precision,
    p75 double precision,
    PRIMARY KEY (pid, obsid, band)
);
-- Replacing the rows of one scene (a re-run) must not scan the whole table. Rows arrive scene by
-- scene, so a BRIN index (a few pages, nearly free to maintain and build) finds a scene's blocks.
CREATE INDEX IF NOT EXISTS {signatures_obsid_index} ON {signatures} USING brin (obsid);

CREATE TABLE IF NOT EXISTS {hists} (
    pid bigint NOT NULL,
    obsid integer NOT NULL,
    hist json NOT NULL,
    PRIMARY KEY (pid, obsid)
);
CREATE INDEX IF NOT EXISTS {hists_obsid_index} ON {hists} USING brin (obsid);
