"""A/B experiments on live traffic: arm assignment, outcome recording and results with
confidence intervals. `stats` and `assign` are pure; `service` ties them to the store and the
serving engine in the API process."""
