"""Publishing: model cards and pushes to the Hub. Imports only `valign.data` (the prompts a card shows)."""
