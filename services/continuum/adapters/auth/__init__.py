"""Authentication: bearer JWTs from an OIDC issuer, and the local development issuer."""
