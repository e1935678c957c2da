"""Several regions: the cluster file, deploys to every region, convergence."""
