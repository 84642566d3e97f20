"""The per-node agent daemon (installed as ``elastictrain.agent``)."""
