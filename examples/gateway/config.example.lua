-- An example config for examples/gateway (copy it, then edit):
--   paygate run examples/gateway --listen 127.0.0.1:8080 --config gw.lua
-- Secrets are never written here: the APIv3 key comes from a file or an
-- environment variable, the private key is a path. A bad config stops
-- the start with one line, "gateway: config.<key>: <reason>", exit 2.
return {
  gateway = {
    db = "sqlite:var/gateway.db",          -- or "postgres://user@host/db"
    -- redis = "redis://127.0.0.1:6379",   -- redis_stream; retention's lease
    -- notify_url base: <public_url>/wechatpay/notify/<mchid>
    public_url = "https://pay.example.com",
    payment_ttl = 7200,                    -- s until an unpaid payment expires
    on_late_payment = "refund",            -- or "alarm"
    degraded = false,                      -- start value of /admin/degrade
    -- admin_token_file = "/etc/paygate/admin.token",
    -- each webhook named: the outbox records by name which webhooks have
    -- an event (an unnamed one is webhook1, webhook2... by its place, and
    -- reordering the list would hand one's events to another)
    webhooks = {
      -- { name = "erp", url = "https://merchant.example/paygate/events",
      --   secret_env = "PAYGATE_WEBHOOK_SECRET" },   -- 32 bytes at least
    },
    -- redis_stream = { stream = "paygate:events" },
    -- dispatcher = { max_attempts = 20 },  -- paygate.outbox dispatcher options
    -- hooks_timeout = 10,                  -- s a gw/hooks.lua hook may take per event
    -- refusal_log = { lines = 10, window = 60 },  -- refusal lines a window
    -- paygate.retention's policy (docs/retention.md); false: no pruning
    -- retention = { outbox_days = 7, notification_hours = 25 },
  },
  merchants = {
    { mchid = "1900000001", appid = "wx0000000000000000",
      merchant_private_key = "/etc/paygate/apiclient_key.pem",
      merchant_certificate = "/etc/paygate/apiclient_cert.pem",
      apiv3_key_file = "/etc/paygate/apiv3.key",    -- or apiv3_key_env = "..."
      -- base_url = "http://127.0.0.1:9000",        -- the simulator
    },
  },
  -- the runtime's own keys sit here too (README, Config file): for
  -- production, HTTPS on the public listener and a pid file for
  -- paygate reload / upgrade --pid-file
  -- listen = "0.0.0.0:8443", workers = 2, admin = "127.0.0.1:9090",
  -- pid_file = "/run/paygate/gateway.pid",
  -- tls = { cert = "/etc/paygate/tls/fullchain.pem",
  --         key = "/etc/paygate/tls/privkey.pem" },
  -- and the notification replay cache's
  -- own dictionary (without it the cache shares paygate's, where other
  -- entries can evict its records; a warning at start says so). 4m: about
  -- 100 notifications a second (docs/wechatpay.md, The replay cache)
  shared = { wechatpay_replay = "4m" },
}
