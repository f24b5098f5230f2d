"""A/B experiments on live traffic: arm assignment, outcome recording and results with
confidence intervals.

`assign`, `stats` and `results` are pure. In the API process, `routing` picks a request's arm,
`outcomes` records and judges what each arm served, and `traffic` plugs both into the serving
handlers through their neutral `TrafficRouter` interface (serving imports nothing from here).
"""
