DROP TABLE bills;
DROP TYPE bill_status;
