"""After training: a finished run directory in, a deployable network out (docs/DEPLOY.md)."""
