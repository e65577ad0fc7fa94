-- Why a scene's last claim was given back (cbm_store_release: extraction failed, run aborted).
-- A 'failed' job is claimable again at once, like an 'ingested' one.
ALTER TABLE {jobs} ADD COLUMN IF NOT EXISTS reason text;
