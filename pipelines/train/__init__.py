"""The one training core (fit), the precision policy, the Ray Train runner, the features table."""
