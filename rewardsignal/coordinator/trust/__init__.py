"""Trust: volunteers' results checked by recomputation. Reputation per worker
(``reputation``), the sampling policy and quarantine (``service``), and the
verification of one shard by a second (and third) worker (``verify``)."""
