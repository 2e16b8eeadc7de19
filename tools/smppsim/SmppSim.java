// An SMSC for the SMPP tests: jSMPP's server session (its PDU codec, bind handshake,
// enquire_link and window handling), scripted over stdin and reporting over stdout.
// Only this thin harness is ours. One command or event per line, fields separated by spaces.
//
// Commands:
//   credentials <system_id> <password>   binds with anything else are refused (RINVSYSID / RINVPASWD)
//   answer <status> [count]              the next submits are answered with <status> (hex; 0 accepts)
//   drop-on-submit <n>                   the n-th submit from now is not answered: the connection drops
//   hold / release                       keep submit answers back / let them go
//   receipt <id> <stat> <err> <text|tlv|both>   a deliver_sm receipt on the last bound session
//   drop                                 close every session's socket without an unbind
//   quit
// Events:
//   listening <port>
//   bind <ok|refused> <system_id> <system_type> <interface_version>
//   submit <id|-> <status> <source> <source_ton> <source_npi> <dest> <esm_class> <data_coding> <registered_delivery> <validity|-> <hex>
//   answered <id> / unanswered <id>       a submit_sm_resp (ESME_ROK) was written / could not be
//   held <count>                          submits waiting for their answer while held
//   message <dest> <parts> <data_coding> <hex of the text, UTF-8>   a whole text, reassembled from its parts
//   enquire_link
//   state <state>
//   receipt_answered <status>

import java.io.BufferedReader;
import java.io.IOException;
import java.io.InputStreamReader;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.util.ArrayDeque;
import java.util.ArrayList;
import java.util.Date;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.concurrent.atomic.AtomicInteger;

import org.jsmpp.SMPPConstant;
import org.jsmpp.bean.BindType;
import org.jsmpp.bean.CancelBroadcastSm;
import org.jsmpp.bean.CancelSm;
import org.jsmpp.bean.DataCodings;
import org.jsmpp.bean.DataSm;
import org.jsmpp.bean.DeliveryReceipt;
import org.jsmpp.bean.ESMClass;
import org.jsmpp.bean.EnquireLink;
import org.jsmpp.bean.InterfaceVersion;
import org.jsmpp.bean.MessageType;
import org.jsmpp.bean.NumberingPlanIndicator;
import org.jsmpp.bean.OptionalParameter;
import org.jsmpp.bean.QueryBroadcastSm;
import org.jsmpp.bean.QuerySm;
import org.jsmpp.bean.RegisteredDelivery;
import org.jsmpp.bean.ReplaceSm;
import org.jsmpp.bean.BroadcastSm;
import org.jsmpp.bean.SubmitMulti;
import org.jsmpp.bean.SubmitSm;
import org.jsmpp.bean.TypeOfNumber;
import org.jsmpp.extra.NegativeResponseException;
import org.jsmpp.extra.ProcessRequestException;
import org.jsmpp.session.BindRequest;
import org.jsmpp.session.BroadcastSmResult;
import org.jsmpp.session.DataSmResult;
import org.jsmpp.session.QueryBroadcastSmResult;
import org.jsmpp.session.QuerySmResult;
import org.jsmpp.session.SMPPServerSession;
import org.jsmpp.session.SMPPServerSessionListener;
import org.jsmpp.session.ServerMessageReceiverListener;
import org.jsmpp.session.ServerResponseDeliveryAdapter;
import org.jsmpp.session.Session;
import org.jsmpp.session.SubmitMultiResult;
import org.jsmpp.session.SubmitSmResult;
import org.jsmpp.util.DeliveryReceiptState;
import org.jsmpp.util.MessageId;

import threegpp.charset.gsm.GSMCharset;

public final class SmppSim implements ServerMessageReceiverListener {
    private String systemId = "otpgate";
    private String password = "secret";
    private final ArrayDeque<Integer> answers = new ArrayDeque<>();
    private int dropOnSubmit = 0;
    private boolean holding = false;
    private int held = 0;
    private final AtomicInteger ids = new AtomicInteger(0x5a000);
    private final List<SMPPServerSession> sessions = new CopyOnWriteArrayList<>();
    private volatile SMPPServerSession last;
    private final Map<String, byte[][]> partials = new HashMap<>();

    static synchronized void emit(String line) {
        System.out.println(line);
        System.out.flush();
    }

    static String hex(byte[] bytes) {
        StringBuilder out = new StringBuilder();
        for (byte b : bytes) out.append(String.format("%02x", b));
        return out.length() == 0 ? "-" : out.toString();
    }

    public static void main(String[] args) throws Exception {
        SmppSim sim = new SmppSim();
        SMPPServerSessionListener listener = new SMPPServerSessionListener(args.length > 0 ? Integer.parseInt(args[0]) : 0);
        listener.setPduProcessorDegree(64);
        listener.setQueueCapacity(1000);
        listener.setMessageReceiverListener(sim);
        listener.setResponseDeliveryListener(new ServerResponseDeliveryAdapter() {
            @Override
            public void onSubmitSmRespSent(SubmitSmResult result, SMPPServerSession source) {
                emit("answered " + result.getMessageId());
            }

            @Override
            public void onSubmitSmRespError(SubmitSmResult result, Exception e, SMPPServerSession source) {
                emit("unanswered " + result.getMessageId());
            }
        });
        emit("listening " + listener.getPort());
        Thread accepting = new Thread(() -> sim.accept(listener), "accept");
        accepting.setDaemon(true);
        accepting.start();
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        for (String line = in.readLine(); line != null; line = in.readLine()) {
            if (line.isBlank()) continue;
            if (line.equals("quit")) break;
            sim.command(line.trim().split(" "));
        }
        listener.close();
        System.exit(0);
    }

    void accept(SMPPServerSessionListener listener) {
        while (true) {
            try {
                SMPPServerSession session = listener.accept();
                Thread binding = new Thread(() -> bind(session), "bind");
                binding.setDaemon(true);
                binding.start();
            } catch (IOException e) {
                return;
            }
        }
    }

    void bind(SMPPServerSession session) {
        try {
            session.addSessionStateListener((now, before, source) -> emit("state " + now));
            BindRequest request = session.waitForBind(5000);
            String ok;
            synchronized (this) {
                ok = request.getBindType() != BindType.BIND_TRX ? "RINVBNDSTS"
                    : !request.getSystemId().equals(systemId) ? "RINVSYSID"
                    : !request.getPassword().equals(password) ? "RINVPASWD" : "";
            }
            String line = request.getSystemId() + " " + (request.getSystemType() == null || request.getSystemType().isEmpty() ? "-" : request.getSystemType())
                + " " + request.getInterfaceVersion();
            if (!ok.isEmpty()) {
                request.reject(ok.equals("RINVSYSID") ? SMPPConstant.STAT_ESME_RINVSYSID
                    : ok.equals("RINVPASWD") ? SMPPConstant.STAT_ESME_RINVPASWD : SMPPConstant.STAT_ESME_RINVBNDSTS);
                emit("bind refused " + line);
                return;
            }
            request.accept("smppsim", InterfaceVersion.IF_34);
            sessions.add(session);
            last = session;
            emit("bind ok " + line);
        } catch (Exception e) {
            emit("bind failed " + e.getClass().getSimpleName() + " " + e.getMessage());
            session.close();
        }
    }

    void command(String[] words) {
        try {
            switch (words[0]) {
                case "credentials" -> { synchronized (this) { systemId = words[1]; password = words[2]; } }
                case "answer" -> {
                    int status = Integer.parseInt(words[1].replace("0x", ""), 16);
                    int count = words.length > 2 ? Integer.parseInt(words[2]) : 1;
                    synchronized (this) { for (int i = 0; i < count; i++) answers.add(status); }
                }
                case "drop-on-submit" -> { synchronized (this) { dropOnSubmit = Integer.parseInt(words[1]); } }
                case "hold" -> { synchronized (this) { holding = true; } }
                case "release" -> { synchronized (this) { holding = false; notifyAll(); } }
                case "drop" -> {
                    for (SMPPServerSession session : sessions) session.close();
                    sessions.clear();
                }
                case "receipt" -> receipt(words[1], words[2], words[3], words[4]);
                default -> emit("error unknown command " + words[0]);
            }
        } catch (Exception e) {
            emit("error " + e.getClass().getSimpleName() + " " + e.getMessage());
        }
    }

    void receipt(String id, String stat, String err, String mode) throws Exception {
        DeliveryReceiptState state = DeliveryReceiptState.valueOf(stat);
        String text = new DeliveryReceipt(id, 1, state == DeliveryReceiptState.DELIVRD ? 1 : 0, new Date(), new Date(),
            state, err, "").toString();
        byte[] shortMessage = mode.equals("tlv") ? new byte[0] : text.getBytes(StandardCharsets.US_ASCII);
        List<OptionalParameter> tlvs = new ArrayList<>();
        if (!mode.equals("text")) {
            tlvs.add(new OptionalParameter.Receipted_message_id(id));
            tlvs.add(new OptionalParameter.Message_state((byte) messageState(state)));
        }
        SMPPServerSession session = last;
        try {
            session.deliverShortMessage("", TypeOfNumber.INTERNATIONAL, NumberingPlanIndicator.ISDN, "79990000000",
                TypeOfNumber.ALPHANUMERIC, NumberingPlanIndicator.UNKNOWN, "otpgate",
                new ESMClass(MessageType.SMSC_DEL_RECEIPT.value()), (byte) 0, (byte) 0, new RegisteredDelivery(0),
                DataCodings.ZERO, shortMessage, tlvs.toArray(new OptionalParameter[0]));
            emit("receipt_answered 0");
        } catch (NegativeResponseException e) {
            emit("receipt_answered " + Integer.toHexString(e.getCommandStatus()));
        }
    }

    static int messageState(DeliveryReceiptState state) {
        return switch (state) {
            case ENROUTE -> 1; case DELIVRD -> 2; case EXPIRED -> 3; case DELETED -> 4;
            case UNDELIV -> 5; case ACCEPTD -> 6; case UNKNOWN -> 7; case REJECTD -> 8;
        };
    }

    @Override
    public SubmitSmResult onAcceptSubmitSm(SubmitSm submit, SMPPServerSession source) throws ProcessRequestException {
        int status;
        boolean drop;
        synchronized (this) {
            drop = dropOnSubmit > 0 && --dropOnSubmit == 0;
            status = drop ? -1 : answers.isEmpty() ? 0 : answers.poll();
            if (!drop && holding) {
                held++;
                emit("held " + held);
                while (holding) {
                    try { wait(); } catch (InterruptedException e) { Thread.currentThread().interrupt(); }
                }
                held--;
            }
        }
        String id = status == 0 ? Integer.toHexString(ids.incrementAndGet()) : "-";
        emit("submit " + id + " " + Integer.toHexString(Math.max(status, 0)) + " " + submit.getSourceAddr() + " "
            + submit.getSourceAddrTon() + " " + submit.getSourceAddrNpi() + " " + submit.getDestAddress() + " "
            + (submit.getEsmClass() & 0xff) + " " + (submit.getDataCoding() & 0xff) + " "
            + (submit.getRegisteredDelivery() & 0xff) + " "
            + (submit.getValidityPeriod() == null || submit.getValidityPeriod().isEmpty() ? "-" : submit.getValidityPeriod())
            + " " + hex(submit.getShortMessage()));
        if (drop) {
            // The connection goes before the answer: this submit was never taken.
            emit("dropped " + submit.getDestAddress());
            source.close();
            sessions.remove(source);
            throw new ProcessRequestException("dropped", SMPPConstant.STAT_ESME_RSYSERR);
        }
        if (status != 0) throw new ProcessRequestException("scripted", status);
        taken(submit);
        try {
            return new SubmitSmResult(new MessageId(id), new OptionalParameter[0]);
        } catch (Exception e) {
            throw new ProcessRequestException(e.getMessage(), SMPPConstant.STAT_ESME_RSYSERR);
        }
    }

    // Reassembles concatenated parts (UDH IEI 0x00 or 0x08) and reports the whole text.
    synchronized void taken(SubmitSm submit) {
        byte[] data = submit.getShortMessage();
        int coding = submit.getDataCoding() & 0xff;
        if ((submit.getEsmClass() & 0x40) == 0) {
            emit("message " + submit.getDestAddress() + " 1 " + coding + " " + hex(decode(coding, data)));
            return;
        }
        int udhLength = data[0] & 0xff;
        int iei = data[1] & 0xff;
        int at = iei == 0x08 ? 5 : 4;
        int ref = iei == 0x08 ? ((data[3] & 0xff) << 8) | (data[4] & 0xff) : data[3] & 0xff;
        int total = data[at] & 0xff;
        int seq = data[at + 1] & 0xff;
        String key = submit.getDestAddress() + "/" + ref;
        byte[][] parts = partials.computeIfAbsent(key, k -> new byte[total][]);
        byte[] body = new byte[data.length - udhLength - 1];
        System.arraycopy(data, udhLength + 1, body, 0, body.length);
        parts[seq - 1] = body;
        for (byte[] part : parts) if (part == null) return;
        partials.remove(key);
        ByteBuffer whole = ByteBuffer.allocate(total * 160);
        for (byte[] part : parts) whole.put(part);
        byte[] joined = new byte[whole.position()];
        whole.flip();
        whole.get(joined);
        emit("message " + submit.getDestAddress() + " " + total + " " + coding + " " + hex(decode(coding, joined)));
    }

    static byte[] decode(int coding, byte[] data) {
        String text = coding == 8 ? new String(data, StandardCharsets.UTF_16BE)
            : new String(data, new GSMCharset());
        return text.getBytes(StandardCharsets.UTF_8);
    }

    @Override
    public void onAcceptEnquireLink(EnquireLink enquireLink, Session source) {
        emit("enquire_link");
    }

    @Override
    public SubmitMultiResult onAcceptSubmitMulti(SubmitMulti m, SMPPServerSession s) throws ProcessRequestException {
        throw new ProcessRequestException("not supported", SMPPConstant.STAT_ESME_RINVCMDID);
    }

    @Override
    public QuerySmResult onAcceptQuerySm(QuerySm m, SMPPServerSession s) throws ProcessRequestException {
        throw new ProcessRequestException("not supported", SMPPConstant.STAT_ESME_RINVCMDID);
    }

    @Override
    public void onAcceptReplaceSm(ReplaceSm m, SMPPServerSession s) throws ProcessRequestException {
        throw new ProcessRequestException("not supported", SMPPConstant.STAT_ESME_RINVCMDID);
    }

    @Override
    public void onAcceptCancelSm(CancelSm m, SMPPServerSession s) throws ProcessRequestException {
        throw new ProcessRequestException("not supported", SMPPConstant.STAT_ESME_RINVCMDID);
    }

    @Override
    public BroadcastSmResult onAcceptBroadcastSm(BroadcastSm m, SMPPServerSession s) throws ProcessRequestException {
        throw new ProcessRequestException("not supported", SMPPConstant.STAT_ESME_RINVCMDID);
    }

    @Override
    public void onAcceptCancelBroadcastSm(CancelBroadcastSm m, SMPPServerSession s) throws ProcessRequestException {
        throw new ProcessRequestException("not supported", SMPPConstant.STAT_ESME_RINVCMDID);
    }

    @Override
    public QueryBroadcastSmResult onAcceptQueryBroadcastSm(QueryBroadcastSm m, SMPPServerSession s)
            throws ProcessRequestException {
        throw new ProcessRequestException("not supported", SMPPConstant.STAT_ESME_RINVCMDID);
    }

    @Override
    public DataSmResult onAcceptDataSm(DataSm m, Session s) throws ProcessRequestException {
        throw new ProcessRequestException("not supported", SMPPConstant.STAT_ESME_RINVCMDID);
    }
}
