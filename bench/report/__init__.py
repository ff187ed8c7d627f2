"""Reports from results rows: the markdown leaderboard and Pareto plots (`leaderboard`), the web page (`webpage`)."""
