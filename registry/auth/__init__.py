"""Who is calling (principals, tokens) and what they may do (scopes)."""
