"""The shared tier's Lua scripts (``workers/shared_tier.py``). Each mutation is one
script, so it is all or nothing; each does every read and check before its first
write, because Redis (6.2 and later) refuses a script's write at ``maxmemory`` only
while the script has written nothing yet, so a refused script has changed nothing.

KEYS, in this order: ``used``, ``blocks``, ``refs``, ``records``, ``sizes``
(``shared_tier.py``'s module docstring describes each).
"""

PUT = """
local capacity, sid, record, n = tonumber(ARGV[1]), ARGV[2], ARGV[3], tonumber(ARGV[4])
local new, order = {}, {}
for i = 5, 4 + n do
  local h = ARGV[i]
  if not new[h] then new[h] = true; order[#order + 1] = h end
end
local data = {}
for i = 5 + n, #ARGV, 2 do data[ARGV[i]] = ARGV[i + 1] end
local old, old_order = {}, {}
local previous = redis.call('HGET', KEYS[4], sid)
if previous then
  for h in string.gmatch(cjson.decode(previous).blocks, '%S+') do
    if not old[h] then old[h] = true; old_order[#old_order + 1] = h end
  end
end
local added, nbytes, freed = 0, 0, 0
for _, h in ipairs(order) do
  if redis.call('HEXISTS', KEYS[2], h) == 1 then
    nbytes = nbytes + redis.call('HSTRLEN', KEYS[2], h)
  elseif data[h] then
    added = added + #data[h]; nbytes = nbytes + #data[h]
  else
    return {'missing', h}
  end
end
for _, h in ipairs(old_order) do
  if not new[h] and tonumber(redis.call('HGET', KEYS[3], h)) == 1 then
    freed = freed + redis.call('HSTRLEN', KEYS[2], h)
  end
end
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
-- A put that does not grow passes even above capacity (a client with a smaller
-- capacity_bytes may share this namespace): it can only bring used down.
if added - freed > 0 and used + added - freed > capacity then
  return {'full', added - freed, capacity - used}
end
for _, h in ipairs(order) do
  if not old[h] and redis.call('HINCRBY', KEYS[3], h, 1) == 1 then
    redis.call('HSET', KEYS[2], h, data[h])
  end
end
for _, h in ipairs(old_order) do
  if not new[h] and redis.call('HINCRBY', KEYS[3], h, -1) <= 0 then
    redis.call('HDEL', KEYS[3], h); redis.call('HDEL', KEYS[2], h)
  end
end
redis.call('INCRBY', KEYS[1], added - freed)
redis.call('HSET', KEYS[4], sid, record)
redis.call('HSET', KEYS[5], sid, nbytes)
return {'ok', added}
"""

# ARGV: capacity, need ('' drops every listed session), session ids in drop order.
# The record is deleted first: HDEL is allowed at maxmemory, and once a script has
# written, its later writes are too, so dropping always works under memory pressure.
DROP = """
local capacity, need = tonumber(ARGV[1]), tonumber(ARGV[2])
local free = capacity - tonumber(redis.call('GET', KEYS[1]) or '0')
local freed, dropped = 0, {}
for i = 3, #ARGV do
  if need and free + freed >= need then break end
  local sid = ARGV[i]
  local record = redis.call('HGET', KEYS[4], sid)
  if record then
    redis.call('HDEL', KEYS[4], sid); redis.call('HDEL', KEYS[5], sid)
    local seen = {}
    for h in string.gmatch(cjson.decode(record).blocks, '%S+') do
      if not seen[h] then
        seen[h] = true
        if redis.call('HINCRBY', KEYS[3], h, -1) <= 0 then
          freed = freed + redis.call('HSTRLEN', KEYS[2], h)
          redis.call('HDEL', KEYS[3], h); redis.call('HDEL', KEYS[2], h)
        end
      end
    end
    dropped[#dropped + 1] = sid
  end
end
if freed > 0 then redis.call('DECRBY', KEYS[1], freed) end
return {freed, dropped}
"""

# Flat [hash, size, hash, size, ...] of the blocks hash, without moving the bytes.
BLOCK_SIZES = """
local sizes = {}
for _, h in ipairs(redis.call('HKEYS', KEYS[1])) do
  sizes[#sizes + 1] = h; sizes[#sizes + 1] = redis.call('HSTRLEN', KEYS[1], h)
end
return sizes
"""
