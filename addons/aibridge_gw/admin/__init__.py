"""The operator's side: the CLI, its link to a running gateway, the admin API and the guides."""
