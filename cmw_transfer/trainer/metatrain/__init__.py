"""The meta-train stages: ``metatrain`` (cmwnet / mwnet / cmwnet-sl, in ``stage``) and ``advisor`` (extends it)."""
