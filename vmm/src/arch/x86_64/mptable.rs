//! MP (MultiProcessor specification 1.4) table that announces vCPUs, buses and the IOAPIC.
