"""`smolcluster experiment`: arms x seeds of sim runs, their statistics, report and plots.

spec.py reads the experiment file; runner.py runs (and resumes) it into the directory layout.py
describes; results.py turns the run directories into results.json, the report table and the plots;
stats.py holds the medians and bootstrap intervals."""
