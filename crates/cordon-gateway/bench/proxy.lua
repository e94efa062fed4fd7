-- wrk through an explicit proxy: absolute-form URI and a matching Host header.
-- TARGET (host:port of the origin) defaults to 127.0.0.1:28080.
local target = os.getenv("TARGET") or "127.0.0.1:28080"
wrk.path = "http://" .. target .. "/"
wrk.headers["Host"] = target
