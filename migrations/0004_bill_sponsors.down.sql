DROP TABLE bill_sponsors;
