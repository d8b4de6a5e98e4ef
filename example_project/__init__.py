"""An order pipeline whose events arrive out of order, kept in causal order by celery-causal."""
