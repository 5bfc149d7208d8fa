"""The search page and its JSON HTTP API: a gateway in front of teran.v1.SearchService (`python -m webui`)."""
