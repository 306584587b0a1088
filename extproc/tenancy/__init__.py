"""Tenancy: who sent a request, what it may do, and how the pool is shared when it is full.

    identity   -> the tenant, from an API key, a trusted header or the default  (identity.py)
    policy     -> its models, limits, priority, weight and cache isolation      (policy.py)
    limits     -> requests/tokens per minute, concurrency; local or in Redis    (limits.py,
                                                                                 redis_limits.py)
    fair queue -> under saturation, weighted fair queuing on tokens              (fair_queue.py)
    salt       -> the tenant's `cache_salt`, so tenants never share KV blocks    (salt.py)
    gate       -> the lease and the queue place, held from the limits to the pick and
                  given back unless the request is routed                     (gate.py)

Nothing here knows HTTP: refusals are values the pipeline turns into OpenAI errors.
"""
