"""Rendezvous on etcd v3: torch's backend contract and a c10d store."""
