-- wrk script: ad events with a skewed ad id, a few event types, campaigns and user agents.
local evs = { "view", "view", "view", "view", "click", "conversion" }
local cmps = { "winter_sale", "brand", "retarget" }
local uas = {
  "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
  "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
  "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36",
}
math.randomseed(os.time())
request = function()
  local ad = 1 + math.floor(math.random() ^ 3 * 200)
  local path = string.format("/e?ad=%d&ev=%s&cmp=%s", ad, evs[math.random(#evs)], cmps[math.random(#cmps)])
  return wrk.format("GET", path, { ["User-Agent"] = uas[math.random(#uas)] })
end
