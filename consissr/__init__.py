"""ConsisSR."""
