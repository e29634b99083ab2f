-- UPDATE and DELETE must carry the whole old row, and the publication the service reads.
ALTER TABLE messages REPLICA IDENTITY FULL;
ALTER TABLE calls REPLICA IDENTITY FULL;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'badges') THEN
        CREATE PUBLICATION badges FOR TABLE messages, calls
            WITH (publish = 'insert, update, delete, truncate');
    END IF;
END
$$;
