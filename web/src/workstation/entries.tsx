/** Rendering of staff history entries and attachments (shared by the desk and the inspector). */
import { Fragment } from 'preact';
import { useEffect, useState } from 'preact/hooks';
import { formatBytes, isImage, type Attachment } from '../shared/files';
import { formatWhen } from '../shared/format';
import { PaperclipIcon } from '../shared/icons';
import type { DeliveryMark } from './operator-state';
import type { Entry } from './types';
import { useApp } from './ui';

export function AttachmentView(props: { a: Attachment }) {
  const { api, t } = useApp();
  const { a } = props;
  const [url, setUrl] = useState<string | null>(null);
  const [failed, setFailed] = useState(false);
  const path = '/api/attachments/' + encodeURIComponent(a.id);
  useEffect(() => {
    if (!isImage(a.content_type)) return;
    let u: string | null = null;
    let live = true;
    api
      .blob(path)
      .then((b) => {
        if (!live) return;
        u = URL.createObjectURL(b);
        setUrl(u);
      })
      .catch(() => live && setFailed(true));
    return () => {
      live = false;
      if (u) URL.revokeObjectURL(u);
    };
  }, [a.id]);
  const download = async (e: Event) => {
    e.preventDefault();
    try {
      const b = await api.blob(path);
      const u = URL.createObjectURL(b);
      const link = document.createElement('a');
      link.href = u;
      link.download = a.name;
      link.click();
      setTimeout(() => URL.revokeObjectURL(u), 10000);
    } catch {
      setFailed(true);
    }
  };
  if (isImage(a.content_type) && url) {
    return (
      <a class="att att-image" href={url} target="_blank" rel="noopener" data-testid="attachment-image">
        <img src={url} alt={a.name} loading="lazy" />
      </a>
    );
  }
  return (
    <a class="att att-file" href={path} onClick={download} data-testid="attachment-file">
      <PaperclipIcon /> {a.name} <span class="muted">({formatBytes(a.size)})</span>
      {failed && <span class="error"> · {t('attachment_unavailable')}</span>}
    </a>
  );
}

/** Operators' display names as a conversation's history gives them (id → name). */
export function operatorNames(entries: readonly Entry[]): Record<string, string> {
  const names: Record<string, string> = {};
  for (const e of entries) if (e.operator && e.name) names[e.operator] = e.name;
  return names;
}

/** The mark next to an entry of ours (see deliveryOf): a glyph with its words for screen
 *  readers, or, when something is wrong, the words on screen. */
function DeliveryView(props: { mark: DeliveryMark }) {
  const { t } = useApp();
  const { mark } = props;
  const label = t(mark.label);
  return (
    <span
      class={'delivery delivery-' + mark.state + (mark.status ? ' delivery-out' : '')}
      data-testid="delivery"
      data-status={mark.status}
      title={mark.reason ? label + ': ' + mark.reason : label}
    >
      {mark.loud ? (
        <>
          <span aria-hidden="true">{mark.glyph}</span>
          <span class="delivery-text"> {mark.detail ? label + ': ' + mark.detail : label}</span>
        </>
      ) : (
        <>
          {mark.glyph}
          <span class="sr-only"> {label}</span>
        </>
      )}
    </span>
  );
}

export function EntryView(props: {
  e: Entry;
  mine?: boolean;
  delivery?: DeliveryMark;
  operatorId?: string;
  /** The customer's name, shown on their messages (else "Visitor"). */
  visitor?: string;
  /** Operators' display names by id, for transfer notes. */
  names?: Record<string, string>;
}) {
  const { t, lang } = useApp();
  const { e } = props;
  const nameOf = (id: string | undefined) => (id ? props.names?.[id] ?? id : '');
  const time = (
    <time dateTime={new Date(e.at).toISOString()} class="time">
      {formatWhen(e.at, lang)}
    </time>
  );
  if (e.kind === 'message') {
    const who = e.from === 'client' || e.from === 'bot' ? e.from : props.mine || (props.operatorId && e.operator === props.operatorId) ? 'mine' : 'operator';
    return (
      <li class={'msg msg-' + who} data-testid="message" data-seq={e.seq} data-from={e.from}>
        <span class="who">{e.from === 'client' ? props.visitor || t('visitor') : e.from === 'bot' ? t('bot') : e.name || e.operator || t('operator')}</span>
        {e.text ? <span class="text">{e.text}</span> : null}
        {e.buttons?.length ? (
          <ul class="bot-buttons" aria-label={t('bot_buttons')} data-testid="bot-buttons">
            {e.buttons.map((b) => (
              <li key={b}>{b}</li>
            ))}
          </ul>
        ) : null}
        {e.attachments?.length ? (
          <span class="atts">
            {e.attachments.map((a) => (
              <AttachmentView key={a.id} a={a} />
            ))}
          </span>
        ) : null}
        <span class="meta">
          {time}
          {props.delivery && <DeliveryView mark={props.delivery} />}
        </span>
      </li>
    );
  }
  if (e.kind === 'note') {
    return (
      <li class="note" data-testid="entry-note" data-seq={e.seq}>
        <span class="who">
          {t('note_by', { name: e.name || e.author || '' })} <span class="note-tag">{t('internal')}</span>
        </span>
        <span class="text">{e.text}</span>
        <span class="meta">{time}</span>
      </li>
    );
  }
  if (e.kind === 'handoff') {
    const context = Object.entries(e.context ?? {});
    return (
      <li class="handoff" data-testid="entry-handoff" data-seq={e.seq}>
        <strong class="handoff-title" data-testid="handoff-title">
          {e.reason ? t('entry_handoff_reason', { group: e.group ?? '', reason: e.reason }) : t('entry_handoff', { group: e.group ?? '' })}
        </strong>
        {context.length > 0 && (
          <>
            <span class="small muted">{t('handoff_context')}</span>
            <dl class="kv handoff-context" data-testid="handoff-context">
              {context.map(([k, v]) => (
                <Fragment key={k}>
                  <dt>{k}</dt>
                  <dd>{v}</dd>
                </Fragment>
              ))}
            </dl>
          </>
        )}
        <span class="meta">{time}</span>
      </li>
    );
  }
  let text = '';
  switch (e.kind) {
    case 'started':
      text = t('entry_started', { channel: e.channel ?? '' });
      break;
    case 'queued':
      text = t('entry_queued', { group: e.group ?? '' });
      break;
    case 'with_bot':
      text = t('entry_with_bot');
      break;
    case 'assigned':
      text = t('entry_assigned', { name: e.name || e.operator || '' });
      break;
    case 'transferred':
      text = t('entry_transferred', { from: nameOf(e.from), to: e.to_operator ? nameOf(e.to_operator) : e.to_group ?? '' }) + (e.comment ? ' — «' + e.comment + '»' : '');
      break;
    case 'closed':
      text =
        t(e.by === 'client' ? 'entry_closed_client' : e.by === 'system' ? 'entry_closed_system' : 'entry_closed_operator') +
        (e.resolution ? ' · ' + t('resolution') + ': ' + e.resolution : '') +
        (e.tags?.length ? ' · ' + e.tags.map((x) => '#' + x).join(' ') : '');
      break;
    case 'rated':
      text = t('entry_rated', { score: e.score ?? 0 }) + (e.comment ? ' — «' + e.comment + '»' : '');
      break;
    case 'notice':
      text = t('entry_notice', { text: e.text ?? '' });
      break;
    default:
      text = e.kind;
  }
  return (
    <li class={'sys sys-' + e.kind} data-testid={'entry-' + e.kind} data-seq={e.seq}>
      <span>{text}</span> {time}
      {props.delivery && <DeliveryView mark={props.delivery} />}
    </li>
  );
}
