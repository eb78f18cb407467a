'use strict';
// Submits one raw message with nodemailer, for tests/interop/test_clients.py.
//
// Reads one JSON job on stdin:
//   {host, port, secure, requireTLS, name, servername, ca,
//    auth: {user, pass}, authMethod: "PLAIN" | "LOGIN",
//    envelope: {from, to: [...], use8BitMime}, raw_b64}
// and prints {response, accepted, rejected, messageId} as JSON on stdout. Any failure
// is printed on stderr with a non-zero exit status.
//
// The message is passed as `raw` (base64 in the job, so 8-bit octets survive JSON):
// nodemailer then sends it unchanged, apart from the dot-stuffing and CRLF line ends
// of its SMTP data stream, which a CRLF message does not need.

const fs = require('node:fs');
const nodemailer = require('nodemailer');

async function main() {
    const job = JSON.parse(fs.readFileSync(0, 'utf8'));
    const transport = nodemailer.createTransport({
        host: job.host,
        port: job.port,
        secure: job.secure, // true: implicit TLS (465); false: plaintext, then STARTTLS
        requireTLS: job.requireTLS, // fail rather than send without STARTTLS
        ignoreTLS: false,
        name: job.name, // the EHLO argument
        servername: job.servername, // SNI and the name the certificate must carry
        auth: { user: job.auth.user, pass: job.auth.pass },
        authMethod: job.authMethod,
        tls: {
            ca: [fs.readFileSync(job.ca)],
            servername: job.servername,
            rejectUnauthorized: true,
        },
        connectionTimeout: 20000,
        greetingTimeout: 20000,
        socketTimeout: 20000,
        logger: false,
        debug: false,
    });
    try {
        const info = await transport.sendMail({
            envelope: job.envelope,
            raw: Buffer.from(job.raw_b64, 'base64'),
        });
        process.stdout.write(
            JSON.stringify({
                response: info.response,
                accepted: info.accepted,
                rejected: info.rejected,
                messageId: info.messageId,
            }) + '\n'
        );
    } finally {
        transport.close();
    }
}

main().catch((error) => {
    process.stderr.write(String((error && error.stack) || error) + '\n');
    process.exitCode = 1;
});
