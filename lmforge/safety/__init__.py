"""Safety tools: `moderation` flags harmful requests and offensive text (`lmforge moderate`)."""
