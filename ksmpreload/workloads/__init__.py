"""The workloads the tool measures and demonstrates (issue 13): how to start each program."""
