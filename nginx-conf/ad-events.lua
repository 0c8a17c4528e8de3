-- wrk script: ad events with a skewed ad id, a few event types, campaigns, users (uid) and
-- user agents; one request in ten goes to an API endpoint instead (/api/search, /api/report).
local evs = { "view", "view", "view", "view", "click", "conversion" }
local cmps = { "winter_sale", "brand", "retarget" }
local uas = {
  "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
  "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
  "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36",
}
math.randomseed(os.time())
-- Campaigns differ in how often a view becomes a click.
local click_rate = { winter_sale = 0.08, brand = 0.02, retarget = 0.15 }
request = function()
  local r = math.random()
  if r < 0.07 then
    return wrk.format("GET", "/api/search?q=" .. math.random(1000))
  elseif r < 0.1 then
    return wrk.format("GET", "/api/report?id=" .. math.random(100))
  end
  local ad = 1 + math.floor(math.random() ^ 3 * 200)
  local cmp = cmps[math.random(#cmps)]
  local ev = evs[math.random(#evs)]
  if ev ~= "conversion" then
    ev = (math.random() < click_rate[cmp]) and "click" or "view"
  end
  local uid = 1 + math.floor(math.random() ^ 2 * 50000)
  local path = string.format("/e?ad=%d&ev=%s&cmp=%s&uid=u%d", ad, ev, cmp, uid)
  return wrk.format("GET", path, { ["User-Agent"] = uas[math.random(#uas)] })
end
