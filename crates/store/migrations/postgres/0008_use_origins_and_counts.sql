-- Where a key's last valid use came from, told apart: the address the
-- verify listener saw (the peer, or the forwarded client behind a trusted
-- proxy) and the `client_ip` the calling backend claimed (NULL when it
-- sent none); how many valid and how many rejected uses it had (rejected:
-- the secret matched but the answer was INSUFFICIENT_SCOPE, EXPIRED,
-- REVOKED or ROTATED); and when and from where it was last rejected.
--
-- `last_used_at` / `last_used_ip` stay as they were: `last_used_ip` keeps
-- the claimed address when one was sent, else the observed one. Rows used
-- before this migration cannot say which it was, so their observed and
-- claimed columns start NULL (until the next valid use) and their counts
-- start at 0: counts are since this migration. The service role's UPDATE
-- on `keys` covers the new columns.
ALTER TABLE keys
    ADD COLUMN last_used_observed_ip TEXT,
    ADD COLUMN last_used_claimed_ip  TEXT,
    ADD COLUMN valid_uses            BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN rejected_uses         BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN last_rejected_at      TIMESTAMPTZ,
    ADD COLUMN last_rejected_ip      TEXT;
