"""The rotating proxy gateway (`python -m engine.run serve-proxy`): one local proxy endpoint
(HTTP, CONNECT and SOCKS5 on one port) over the validated pool.

Modules, one job each: `server` (listener, per-connection flow, failover), `http` (request
heads under limits, response framing), `socks5` (server-side handshake), `upstream` (dialing
through a member), `members` (the stored pool, filtered and refreshed), `auth` (client
credentials and routing by username), `cache` (what may be cached), `stats` and `metrics`
(counters, `/metrics`, `/metrics.json`), `health` (background re-checks), `service` (it all
assembled). Member selection, breakers and per-site quality are `fetchers.pool`'s, shared
with the cascade.
"""
