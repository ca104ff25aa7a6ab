"""What people look at: figures, result tables, result files and the cross-run report."""
