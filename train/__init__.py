"""UniAlignment training tools."""
