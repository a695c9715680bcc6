"""The ExplorerJob operator (named so it never shadows the standard-library `operator`)."""
