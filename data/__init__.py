"""From any dataset row to Harmony token ids and a loss mask."""
