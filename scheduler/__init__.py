"""memserve.scheduler — the policy (batch planning, KV block selection, routing)."""
